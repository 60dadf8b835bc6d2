"""The chat template sandbox's bounds inside single operations: loops with no operation in their
body, filters that go item by item or character by character, string operations whose result is
the product of two allowed sizes, and integers squared in a loop. Each is refused within seconds
and without a memory spike; templates that stay within the limits render as plain Jinja does."""

from __future__ import annotations

import re
import resource
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torchless import chat_template
from torchless.chat_template import render_chat_template
from torchless.errors import TorchlessError

BIG = "{% set s = 'x' * 16000000 %}"
ESCAPES = {  # each ran for minutes, or built gigabytes, below the earlier limits
    "{% set s = 'x' * 4000 %}{% for c in s %}{% for d in s %}{% for e in s %}{% endfor %}{% endfor %}{% endfor %}":
        "rendering took more than",
    "{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}":
        "a product of",
    "{{ ('xyz' * 5000000)|list|sort|length }}": "more than 1048576 items",
    "{{ ('x' * 16000000)|batch(1)|list|length }}": "more than 1048576 items",
    "{{ ('x' * 16000000)|unique|list|length }}": "more than 1048576 items",
    "{{ ('<a>' * 5000000)|striptags|length }}": "striptags of 15000000 characters",
    "{{ ('x ' * 8000000)|wordwrap(3)|length }}": "wordwrap of",
    "{{ ('x\n' * 524000)|indent(1000)|length }}": "indent would make",
    "{{ ('x ' * 8000000).split()|length }}": "a list of 8000000 items",
    "{{ ('x' * 16000000)|replace('x', 'y' * 1000) }}": "replace would make",
    "{{ ('x' * 16000000).replace('x', 'yy') }}": "replace would make",
    "{{ ('\t' * 100000).expandtabs(10000) }}": "expandtabs would make",
    "{{ (['a'] * 1000000)|join('b' * 16000000) }}": "a join would be more than",
    "{{ ('b' * 16000000).join(['a'] * 1000) }}": "a join would be more than",
    BIG + "{{ ([s] * 1000)|join }}": "a join would be more than",
    BIG + "{{ [s] * 1000 }}": "an output value would be more than",
    BIG + "{{ ([s] * 1000)|tojson }}": "tojson of this value would be more than",
    BIG + "{{ s ~ ([s] * 1000) }}": "a ~ concatenation would be more than",
    BIG + "{{ '%s' % ([s] * 1000) }}": "a % formatting would be more than",
}


@pytest.mark.parametrize("template", ESCAPES)
def test_long_single_operations_are_refused(monkeypatch, template):
    # The time limit is short only where it is the limit under test: the size limits must be
    # met first even on a busy CI machine, where the clock runs out sooner in work done.
    seconds = 2.0 if ESCAPES[template] == "rendering took more than" else 30.0
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", seconds)
    chat_template._compile.cache_clear()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(TorchlessError, match=re.escape(ESCAPES[template])):
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < seconds + 4
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400_000  # KiB


SAME = [  # constructs of real templates, on short and long (guarded) sequences
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ m['role'] }}:{{ m['content']|trim }}"
    "{% if not loop.last %},{% endif %}{% if loop.previtem %}<{{ loop.previtem.role }}{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages if m.role == 'user' %}{% set ns.n = ns.n + 1 %}"
    "{% else %}none{% endfor %}{{ ns.n }}",
    "{{ messages|map(attribute='role')|join(',') }}|{{ messages|selectattr('role', 'eq', 'user')|list|length }}",
    "{{ (messages|first).role ~ (messages|last).content ~ 3 }}{{ messages[1:]|length }}",
    "{% for k, v in {'a': 1, 'b': [1, 2]}.items() %}{{ k }}={{ v|tojson }}{% endfor %}",
    "{% for c in messages[0].content %}{{ c|upper }}{% endfor %}{{ messages[0].content|list|unique|sort|join }}",
    "{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}{% endfor %}",
    "{{ messages|sum(attribute='n') }}{{ messages|max(attribute='n') }}{{ messages|groupby('role')|length }}",
]


@pytest.mark.parametrize("n", [3, 3000])
@pytest.mark.parametrize("template", SAME)
def test_templates_within_the_limits_render_as_plain_jinja(template, n):
    messages = [{"role": ("user", "assistant")[i % 2], "content": f" hello {i} " * (1 + 400 * (i == 0)), "n": i}
                for i in range(n)]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols"])
    plain.filters["tojson"] = chat_template._tojson
    expected = plain.from_string(template).render(messages=messages, bos_token="", eos_token="",
                                                  add_generation_prompt=True)
    assert render_chat_template(template, messages) == expected


def test_a_template_cannot_replace_the_guards():
    # the guards are imports of the compiled template, not names a template can set
    out = render_chat_template("{% set _guarded_iter = none %}{% set _concat = none %}"
                               "{% for c in 'ab' * 2000 %}{% endfor %}{{ 'a' ~ 'b' }}", [])
    assert out == "ab"
