"""Chat templates: the model's own Jinja template, rendered the way Hugging Face renders it.

A template comes from the model file, so it is untrusted code. Jinja's sandbox stops it reaching
Python internals; `_BoundedSandbox` also stops it exhausting memory or time: no value it builds
(by `*`, `+`, `%`, `**`, a call or a filter) and not its output may exceed MAX_TEXT characters or
items, no number passed to a call or filter may either (widths such as `center(10**9)`), and
rendering stops after RENDER_SECONDS, checked at every operation the template performs.
"""

from __future__ import annotations

import builtins
import contextvars
import functools
import json
import re
import time
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TorchlessError

# Used when a model has no template of its own: ChatML, which SmolLM2 and Qwen also speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


MAX_TEXT = 1 << 24      # characters of any string, items of any list, and of the whole output
RENDER_SECONDS = 10.0   # real templates render in milliseconds
_MAX_POWER_BITS = 4096  # `**` results: enough for any arithmetic a template does
_WIDE_FIELD = re.compile(r"[0-9]{8,}")  # a format width of 10**7 or more: '%999999999s'
_deadline = contextvars.ContextVar("chat_template_deadline", default=float("inf"))


class _TemplateLimit(jinja2.exceptions.TemplateError):
    pass


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise _TemplateLimit(f"rendering took more than {RENDER_SECONDS:.0f} s")


def _bounded(value):
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEXT:
        raise _TemplateLimit(f"a value of {len(value)} characters or items (limit {MAX_TEXT})")
    return value


def _check_arguments(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_TEXT:
            raise _TemplateLimit(f"the number {value} is too large for a call (limit {MAX_TEXT})")


def _check_format(fmt: str) -> None:
    if _WIDE_FIELD.search(fmt):
        raise _TemplateLimit("a format field of 10**7 or more characters")


def _bounded_filter(name, function):
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment markers
    def bounded(*args, **kwargs):
        _check_time()
        _check_arguments(args, kwargs)
        if name == "format" and args and isinstance(args[0], str):
            _check_format(args[0])
        return _bounded(function(*args, **kwargs))
    return bounded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context, op, left, right):
        _check_time()
        if op == "*":  # repetition: refuse before the value is built
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                if len(sequence) * count > MAX_TEXT:
                    raise _TemplateLimit(f"a repetition of {len(sequence)} x {count} (limit {MAX_TEXT})")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1 and left.bit_length() * right > _MAX_POWER_BITS:
            raise _TemplateLimit(f"{left} ** {right} is too large")
        elif op == "%" and isinstance(left, str):
            _check_format(left)
        return _bounded(super().call_binop(context, op, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_time()
        _check_arguments(args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        if getattr(value, "__name__", None) in ("format", "format_map") \
                and isinstance(getattr(value, "__self__", None), str):
            _check_format(value.__self__)
        return super().wrap_str_format(value)


def _raise_exception(message):
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


_MAX_LIPSUM_WORDS = 10_000


def _bounded_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja's own parameter names
    # Jinja's lipsum builds n paragraphs word by word in Python: lipsum(10**6) runs for minutes,
    # long before any string grows past MAX_TEXT, so its size is bounded before it starts.
    if not all(isinstance(v, int) for v in (n, min, max)) or n * builtins.max(min, max) > _MAX_LIPSUM_WORDS:
        raise _TemplateLimit(f"lipsum({n!r}, max={max!r}) asks for more than {_MAX_LIPSUM_WORDS} words")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["lipsum"] = _bounded_lipsum
    return env.from_string(template)


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TorchlessError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TorchlessError(f"chat message {i} must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise TorchlessError(f"chat message {i} has no {key!r}")
            if not isinstance(message[key], str):
                raise TorchlessError(f"chat message {i}: {key!r} must be a string, "
                                     f"got {type(message[key]).__name__}")
    return list(messages)


def render_chat_template(template: str | None, messages: list[dict], *, bos_token: str = "",
                         eos_token: str = "", add_generation_prompt: bool = True, **extra) -> str:
    """Render `messages` with `template` (None: ChatML), as `apply_chat_template(tokenize=False)`."""
    messages = validate_messages(messages)
    deadline = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        compiled = _compile(template if template is not None else CHATML_TEMPLATE)
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt, **extra):
            size += len(piece)
            if size > MAX_TEXT:
                raise _TemplateLimit(f"the output exceeds {MAX_TEXT} characters")
            _check_time()
            pieces.append(piece)
        return "".join(pieces)
    except jinja2.exceptions.TemplateError as exc:
        raise TorchlessError(f"chat template: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the template is the model file's code: 1/0, 'a' - 1
        raise TorchlessError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _deadline.reset(deadline)
