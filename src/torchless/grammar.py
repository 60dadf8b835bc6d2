"""Structured output: a sampler whose every token keeps the text inside a grammar.

Built on llguidance (the Rust constrained-decoding engine behind Guidance, also a backend of
llama.cpp and vLLM): it compiles JSON schemas, regexes and Lark/GBNF grammars against the
model's own vocabulary (each token's bytes, given here, since a GGUF vocabulary carries no
`tokenizers` decoder it could read) and gives, per step, the tokens that keep the output valid.
Chosen over xgrammar because it needs no torch. The sampler itself is unchanged: it sees logits
with every other token at -inf, so greedy, temperature and the rest work as without a grammar;
the end-of-sequence token is allowed only where the grammar may end. Cost, the per-step mask
over 49k tokens (benchmarks/bench_grammar.py, SmolLM2, 1 thread, decode only): a three-field
JSON schema 0.88-0.89x the tok/s of the same chat without it, tool_choice "required" 0.78-0.80x.

Besides response_format: `grammar=` of the Python API (GBNF text or a LlamaGrammar, as
llama-cpp-python takes it; llguidance converts GBNF to its Lark dialect) and tool calls
(tools.py), whose tool_choice "auto" uses TriggeredSampler: no mask until the model itself
begins a call.
"""

from __future__ import annotations

import json
import weakref
import numpy as np

from .errors import TorchlessError


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes (GGUF vocabularies carry no
    `tokenizers` decoder it could read them from), the special ids, and an encoder."""

    def __init__(self, tokenizer, n_vocab: int):
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else 0
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b""
                       for i in range(n_vocab)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False)


_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {n_vocab: LLTokenizer}


def _tokenizer_of(tokenizer, n_vocab: int):
    """llguidance's view of our tokenizer, built once per tokenizer (it indexes every token)."""
    import llguidance

    built = _built.setdefault(tokenizer, {})
    if n_vocab not in built:
        built[n_vocab] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, n_vocab)),
                                                n_vocab=n_vocab, eos_token=sorted(tokenizer.eos_ids) or None)
    return built[n_vocab]


def grammar_spec(kind: str, spec=None):
    """llguidance's grammar (its JSON form, not yet tied to a vocabulary) for kind "json_object"
    (any JSON object), "json_schema" (spec: the schema, a dict or its JSON text), "regex" or
    "lark"/"gbnf" (spec: the grammar's text). A bad spec raises a one-line TorchlessError."""
    try:
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark
    except ImportError:
        raise TorchlessError("structured output needs llguidance: pip install llguidance") from None
    if kind == "json_object":
        kind, spec = "json_schema", {"type": "object"}
    if kind in ("regex", "lark", "gbnf") and not isinstance(spec, str):
        raise TorchlessError(f"{kind}: the grammar must be a string, got {type(spec).__name__}")
    try:
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec if isinstance(spec, str) else json.dumps(spec), overrides={"whitespace_flexible": False})
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec)
        if kind == "gbnf":
            return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(spec))
    except Exception as e:  # noqa: BLE001 - llguidance's errors: ValueError, its converter's bare Exception
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise TorchlessError(f"{kind}: {lines[0][:300]}") from None
    raise TorchlessError(f"unknown grammar kind {kind!r}")


def compile_grammar(tokenizer, n_vocab: int, kind: str, spec=None):
    """grammar_spec's grammar, checked against this vocabulary (a literal no token sequence can
    write is an error here, not a dead end mid-reply)."""
    return checked_grammar(grammar_spec(kind, spec), tokenizer, n_vocab, kind)


def checked_grammar(grammar, tokenizer, n_vocab: int, kind: str = "grammar"):
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, _tokenizer_of(tokenizer, n_vocab))
    if error and not error.startswith("WARNING"):
        raise TorchlessError(f"{kind}: {error.splitlines()[0][:300]}")
    return grammar


def _matcher(tokenizer, n_vocab: int, grammar):
    import llguidance

    return llguidance.LLMatcher(_tokenizer_of(tokenizer, n_vocab), grammar)


def _pick_within(matcher, sampler, logits: np.ndarray, history, n_prompt: int) -> int:
    """The sampler's pick among the tokens the matcher allows next; the matcher takes it."""
    if matcher.is_error():
        raise TorchlessError(f"structured output: {matcher.get_error()}")
    allowed = np.frombuffer(matcher.compute_logit_bias(), np.uint8)[:len(logits)] > 0
    masked = np.where(allowed, logits, np.float32(-np.inf))  # float32 throughout: no widened copy
    if not np.isfinite(masked).any():
        raise TorchlessError("structured output: the grammar allows no token here")
    token = sampler(masked, history, n_prompt)
    if not matcher.consume_token(token):
        raise TorchlessError(f"structured output: token {token} left the grammar ({matcher.get_error()})")
    return token


class ConstrainedSampler:
    """sampler(logits, history, n_prompt) -> token, only among the tokens the grammar allows
    next; the chosen token then advances the grammar."""

    def __init__(self, sampler, tokenizer, n_vocab: int, grammar):
        self.sampler = sampler
        self.matcher = _matcher(tokenizer, n_vocab, grammar)

    @property
    def params(self):
        return self.sampler.params

    def __call__(self, logits: np.ndarray, history=(), n_prompt: int = 0) -> int:
        return _pick_within(self.matcher, self.sampler, logits, history, n_prompt)


class TriggeredSampler:
    """A lazy grammar: the sampler picks freely while the reply does not begin with `trigger`
    (no mask, no cost); once the model itself has written the whole trigger, every later token
    is kept inside the grammar, whose language all begins with the trigger. Used for
    tool_choice "auto", so that the model alone decides between text and a tool call."""

    def __init__(self, sampler, tokenizer, n_vocab: int, grammar, trigger: str):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.matcher = _matcher(tokenizer, n_vocab, grammar)
        self.trigger_bytes = len(trigger.encode())
        self.written = 0          # bytes of the reply so far, while they may still be the trigger
        self.state = "watching"   # then "free" (plain text) or "constrained"

    @property
    def params(self):
        return self.sampler.params

    def __call__(self, logits: np.ndarray, history=(), n_prompt: int = 0) -> int:
        if self.state == "constrained":
            return _pick_within(self.matcher, self.sampler, logits, history, n_prompt)
        token = self.sampler(logits, history, n_prompt)
        if self.state == "watching":
            # the grammar's language begins with the trigger: a token it takes keeps the reply
            # a prefix of a tool call; one it refuses makes the reply plain text for good
            if self.matcher.validate_tokens([token]) == 1:
                self.matcher.consume_token(token)
                self.written += len(self.tokenizer.token_bytes(token))
                if self.written >= self.trigger_bytes:
                    self.state = "constrained"
            else:
                self.state, self.matcher = "free", None
        return token


def constrain(sampler, tokenizer, n_vocab: int, grammar, trigger: str | None = None):
    """`sampler` kept inside `grammar` (None: unchanged); with a trigger, only once the reply
    has begun with it (TriggeredSampler)."""
    if grammar is None:
        return sampler
    if trigger is not None:
        return TriggeredSampler(sampler, tokenizer, n_vocab, grammar, trigger)
    return ConstrainedSampler(sampler, tokenizer, n_vocab, grammar)


class LlamaGrammar:
    """llama-cpp-python's `LlamaGrammar`: a GBNF grammar (or a JSON schema) to pass as
    `grammar=`. It is compiled by llguidance (its GBNF converter, then its Lark engine), so
    llama.cpp's GBNF syntax is read as llguidance reads it; a JSON schema is compiled directly,
    not through GBNF as llama-cpp-python does. Errors are one-line TorchlessErrors, raised here
    for the syntax and at use for what depends on the vocabulary."""

    def __init__(self, *, _kind: str, _spec: str, verbose: bool = True):
        self.kind, self._grammar = _kind, _spec
        self.compiled = grammar_spec(_kind, _spec)

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(_kind="gbnf", _spec=grammar, verbose=verbose)

    @classmethod
    def from_file(cls, file, verbose: bool = True) -> "LlamaGrammar":
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TorchlessError(f"grammar file {file}: {e}") from None
        return cls.from_string(text, verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(_kind="json_schema", _spec=json_schema, verbose=verbose)

    def __repr__(self) -> str:
        return f"LlamaGrammar.from_{'string' if self.kind == 'gbnf' else self.kind}({self._grammar[:60]!r}...)"


def user_grammar(grammar, tokenizer, n_vocab: int):
    """`grammar=` of the Python API: a GBNF string or a LlamaGrammar (None: no grammar)."""
    if grammar is None:
        return None
    if isinstance(grammar, str):
        grammar = LlamaGrammar.from_string(grammar)
    if not isinstance(grammar, LlamaGrammar):
        raise TorchlessError(f"grammar must be a GBNF string or a LlamaGrammar, got {type(grammar).__name__}")
    return checked_grammar(grammar.compiled, tokenizer, n_vocab, grammar.kind)


def response_format_grammar(response_format, tokenizer, n_vocab: int):
    """The grammar an OpenAI `response_format` asks for, or None for plain text:
    {"type": "json_object"} (llama-cpp-python's optional "schema" too) or
    {"type": "json_schema", "json_schema": {"schema": {...}, ...}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise TorchlessError(f"response_format must be an object with a 'type', got {response_format!r}"[:300])
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return compile_grammar(tokenizer, n_vocab, *(("json_schema", schema) if schema else ("json_object",)))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise TorchlessError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return compile_grammar(tokenizer, n_vocab, "json_schema", spec.get("schema", {}))
    raise TorchlessError(f"response_format type {kind!r} is not supported "
                         "(text, json_object, json_schema)")
