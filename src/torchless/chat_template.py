"""Chat templates: the model's own Jinja template, rendered the way Hugging Face renders it.

A template comes from the model file, so it is untrusted code. Jinja's sandbox stops it reaching
Python internals; `_BoundedSandbox` also stops it exhausting memory or time: no value it builds
(by `*`, `+`, `%`, `**`, a call or a filter) and not its output may exceed MAX_TEXT characters
(MAX_ITEMS items for a list), no number passed to a call or filter may either (widths such as
`center(10**9)`), no integer product may exceed _MAX_INT_BITS, and rendering stops after
RENDER_SECONDS, checked at every operation the template performs and every 1,024 items of any
loop or filter over a long sequence (so `{% for c in s %}{% for d in s %}` cannot run for hours
between two operations). Filters that do slow per-character Python work (wordwrap, urlize,
striptags, ...) take at most _MAX_SLOW_TEXT characters.
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
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import TorchlessError

# Used when a model has no template of its own: ChatML, which SmolLM2 and Qwen also speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


MAX_TEXT = 1 << 24      # characters of any string, and of the whole output
MAX_ITEMS = 1 << 20     # items of any list or tuple, and that one loop or filter may go through
RENDER_SECONDS = 10.0   # real templates render in milliseconds
_MAX_POWER_BITS = 4096  # `**` results: enough for any arithmetic a template does
_MAX_INT_BITS = 1 << 16  # `*` of two integers: squaring in a loop would otherwise grow without end
_MAX_SLOW_TEXT = 1 << 18  # input of the filters below, which are slow per character (striptags: 5 s at 1M)
_SLOW_TEXT_FILTERS = frozenset({"wordwrap", "urlize", "striptags"})
# Filters that go through their input item by item; a long input is handed to them through
# _guarded_iter, which checks the time and counts the items as they are taken.
_ITEM_FILTERS = frozenset({"batch", "groupby", "join", "list", "map", "max", "min", "reject", "rejectattr",
                           "select", "selectattr", "slice", "sort", "sum", "unique"})
_STRINGIFYING_FILTERS = frozenset({"string", "tojson", "pprint", "urlencode", "xmlattr", "e", "escape",
                                   "forceescape", "safe", "trim", "upper", "lower", "capitalize"})
_GUARD_FROM = 1024  # shorter sequences go through as they are: no cost for real templates
_WIDE_FIELD = re.compile(r"[0-9]{8,}")  # a format width of 10**7 or more: '%999999999s'
_deadline = contextvars.ContextVar("chat_template_deadline", default=float("inf"))


class _TemplateLimit(jinja2.exceptions.TemplateError):
    pass


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise _TemplateLimit(f"rendering took more than {RENDER_SECONDS:.0f} s")


def _bounded(value):
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise _TemplateLimit(f"a string of {len(value)} characters (limit {MAX_TEXT})")
    if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
        raise _TemplateLimit(f"a list of {len(value)} items (limit {MAX_ITEMS})")
    return value


def _guarded_iter(iterable):
    """`iterable`, with the time checked every 1,024 items and at most MAX_ITEMS of them; a short
    sequence is returned as it is. Every `for` loop of a template iterates through this."""
    if isinstance(iterable, (str, list, tuple, range, dict, set, frozenset)) and len(iterable) <= _GUARD_FROM:
        return iterable
    if not hasattr(iterable, "__iter__") or isinstance(iterable, jinja2.Undefined):
        return iterable  # jinja raises (or renders nothing) as it would have
    return _guarded_items(iterable)


def _guarded_items(iterable):
    for count, item in enumerate(iterable):
        if count & 1023 == 0:
            _check_time()
            if count >= MAX_ITEMS:
                raise _TemplateLimit(f"a loop or filter over more than {MAX_ITEMS} items")
        yield item


def _text_size(value) -> int:
    """About len(str(value)), without building it: a list holding one 16 MB string a million
    times is small but prints as 16 TB. Stops counting once past MAX_TEXT."""
    total, stack, seen = 0, [value], 0
    while stack and total <= MAX_TEXT:
        v = stack.pop()
        seen += 1
        if seen & 1023 == 0:
            _check_time()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 8
    return total


def _check_text(value, what: str) -> None:
    if not isinstance(value, str) and _text_size(value) > MAX_TEXT:
        raise _TemplateLimit(f"{what} would be more than {MAX_TEXT} characters")


def _check_growth(name: str, value: str, args, kwargs) -> None:
    """Refuse a string operation whose result would pass MAX_TEXT, before it is built (each
    argument is within the limits, the product of two is not)."""
    def arg(i, key, default):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "replace":
        old, new, count = arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", -1)
        if isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
            n = value.count(old) if old else len(value) + 1
            n = min(n, count) if isinstance(count, int) and count >= 0 else n
            size = len(value) + n * (len(new) - len(old))
        else:
            return
    elif name == "expandtabs":
        tab = arg(0, "tabsize", 8)
        size = len(value) + value.count("\t") * tab if isinstance(tab, int) else 0
    elif name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        size = len(value) + (value.count("\n") + 1) * width
    else:
        return
    if size > MAX_TEXT:
        raise _TemplateLimit(f"{name} would make {size} characters (limit {MAX_TEXT})")


def _joined(sep: str, items) -> list:
    """The items of a join, listed, once the joined text is known to stay within MAX_TEXT."""
    items = list(_guarded_iter(items))
    if len(sep) * max(len(items) - 1, 0) + _text_size(items) > MAX_TEXT:
        raise _TemplateLimit(f"a join would be more than {MAX_TEXT} characters")
    return items


def _concat(parts: list) -> str:
    """`a ~ b`: jinja's own concatenation, after checking what it would build."""
    _check_time()
    _check_text(parts, "a ~ concatenation")
    return _bounded("".join(map(str, parts)))


class _GuardTemplate(NodeTransformer):
    """Wraps the sequence of every `for` loop in _guarded_iter and turns every `a ~ b` into a
    call of _concat, through imports that the template cannot shadow."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        guard = nodes.ImportedName(f"{__name__}._guarded_iter", lineno=node.lineno)
        node.iter = nodes.Call(guard, [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        concat = nodes.ImportedName(f"{__name__}._concat", lineno=node.lineno)
        return nodes.Call(concat, [nodes.List(node.nodes, lineno=node.lineno)], [], None, None,
                          lineno=node.lineno)


def _check_arguments(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_TEXT:
            raise _TemplateLimit(f"the number {value} is too large for a call (limit {MAX_TEXT})")


def _check_format(fmt: str) -> None:
    if _WIDE_FIELD.search(fmt):
        raise _TemplateLimit("a format field of 10**7 or more characters")


def _bounded_filter(name, function):
    # jinja passes the context, eval context or environment first to some filters: the value
    # filtered is the first argument after those.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment markers
    def bounded(*args, **kwargs):
        _check_time()
        _check_arguments(args, kwargs)
        value = args[skip] if len(args) > skip else None
        if name == "format" and isinstance(value, str):
            _check_format(value)
        if name in _SLOW_TEXT_FILTERS and isinstance(value, str) and len(value) > _MAX_SLOW_TEXT:
            raise _TemplateLimit(f"{name} of {len(value)} characters (limit {_MAX_SLOW_TEXT})")
        if isinstance(value, str):
            _check_growth(name, value, args[skip + 1:], kwargs)
        elif name in _STRINGIFYING_FILTERS:
            _check_text(value, f"{name} of this value")
        if name == "join" and value is not None:
            sep = args[skip + 1] if len(args) > skip + 1 else kwargs.get("d", "")
            args = (*args[:skip], _joined(sep if isinstance(sep, str) else "", value), *args[skip + 1:])
        elif name in _ITEM_FILTERS and value is not None:
            args = (*args[:skip], _guarded_iter(value), *args[skip + 1:])
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
                limit = MAX_TEXT if isinstance(sequence, str) else MAX_ITEMS
                if len(sequence) * count > limit:
                    raise _TemplateLimit(f"a repetition of {len(sequence)} x {count} (limit {limit})")
            elif isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _TemplateLimit(f"a product of {left.bit_length()}- and {right.bit_length()}-bit integers")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1 and left.bit_length() * right > _MAX_POWER_BITS:
            raise _TemplateLimit(f"{left} ** {right} is too large")
        elif op == "%" and isinstance(left, str):
            _check_format(left)
            _check_text(right, "a % formatting")
        return _bounded(super().call_binop(context, op, left, right))

    def _parse(self, source, name, filename):
        return _GuardTemplate().visit(super()._parse(source, name, filename))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_time()
        _check_arguments(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # a string's method: 'x'.replace(...), ', '.join(...)
            if __obj.__name__ == "join" and args:
                args = (_joined(owner, args[0]), *args[1:])
            else:
                _check_growth(__obj.__name__, owner, args, kwargs)
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


def _finalize(value):
    """Every `{{ value }}`, before it becomes text."""
    _check_text(value, "an output value")
    return value


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
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                          finalize=_finalize)
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["lipsum"] = _bounded_lipsum
    return env.from_string(template)


@lru_cache(maxsize=16)
def template_variables(template: str | None) -> frozenset:
    """The variables a template reads from outside (`tools`, `messages`, ...); none for one
    that does not parse (rendering it reports the error)."""
    if template is None:
        return frozenset()
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_compile(template).environment.parse(template)))
    except jinja2.exceptions.TemplateError:
        return frozenset()


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
