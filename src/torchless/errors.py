"""Errors a user can cause. The CLI prints these as one line; anything else is a bug.

Messages often quote what a file says (tensor names, keys, values), and a hostile file can say
anything: control bytes, megabytes of text. `shown` quotes such a value safely, and every
TorchlessError message is made one bounded line as a last guard.
"""

MAX_MESSAGE = 300  # characters of a whole message
MAX_SHOWN = 60     # characters of one quoted value


def _clip(text: str, limit: int) -> str:
    """`text` cut in the middle to about `limit` characters: a message starts with the file and
    ends with the problem, and both matter."""
    if len(text) <= limit:
        return text
    keep = (limit - 24) // 2
    return f"{text[:keep]} ...({len(text)} chars)... {text[-keep:]}"


def shown(value, limit: int = MAX_SHOWN) -> str:
    """A file-provided value as it may appear in a message: repr-escaped (no control bytes,
    so no second line and no terminal escapes) and clipped to about `limit` characters."""
    if isinstance(value, (bytes, str)):
        text = repr(value[:limit + 1])  # escaping first would cost time on a megabyte string
        if len(value) > limit:
            return f"{text[:limit]}... ({len(value)} chars)"
        return text
    return _clip(" ".join(repr(value).split()), limit)


def one_line(message: str) -> str:
    """`message` with control characters escaped and its length bounded."""
    if not message.isprintable():
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return _clip(message, MAX_MESSAGE)


class TorchlessError(ValueError):
    """Base class: bad input from the user or a bad file, never a bug in torchless."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(str(message)))


class ModelFileError(TorchlessError):
    """A model file is truncated, corrupt, or not what it claims to be."""


class UnsupportedModelError(TorchlessError):
    """A well-formed file that torchless cannot run (architecture, quantization type)."""


class ContextOverflowError(TorchlessError):
    """A prompt or generation that does not fit in the model's context."""
