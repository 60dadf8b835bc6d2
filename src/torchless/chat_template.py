"""Chat templates: the model's own Jinja template, rendered the way Hugging Face renders it."""

from __future__ import annotations

import json
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


def _raise_exception(message):
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
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
    try:
        compiled = _compile(template if template is not None else CHATML_TEMPLATE)
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.TemplateError as exc:
        raise TorchlessError(f"chat template: {exc}") from None
