"""Structured output: a sampler whose every token keeps the text inside a grammar.

Built on llguidance (the Rust constrained-decoding engine behind Guidance, also a backend of
llama.cpp and vLLM): it compiles JSON schemas, regexes and Lark/GBNF grammars against the
model's own vocabulary (each token's bytes, given here, since a GGUF vocabulary carries no
`tokenizers` decoder it could read) and gives, per step, the tokens that keep the output valid.
Chosen over xgrammar because it needs no torch. The sampler itself is unchanged: it sees logits
with every other token at -inf, so greedy, temperature and the rest work as without a grammar;
the end-of-sequence token is allowed only where the grammar may end. Cost: SmolLM2, a
three-field schema, 64 tokens, 0.67x the tok/s of the same chat without it (on a busy machine;
the per-step mask over 49k tokens is the price).
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


def compile_grammar(tokenizer, n_vocab: int, kind: str, spec=None):
    """An llguidance grammar (its JSON form) for kind "json_object" (any JSON object),
    "json_schema" (spec: the schema), "regex" or "lark"/"gbnf" (spec: the grammar's text).
    Bad specs raise a one-line TorchlessError."""
    try:
        import llguidance
    except ImportError:
        raise TorchlessError("structured output needs llguidance: pip install llguidance") from None
    if kind == "json_object":
        kind, spec = "json_schema", {"type": "object"}
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                spec if isinstance(spec, str) else json.dumps(spec), overrides={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec)
        elif kind == "gbnf":
            grammar = llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark(spec))
        else:
            raise TorchlessError(f"unknown grammar kind {kind!r}")
    except (ValueError, TypeError) as e:  # llguidance's compile errors
        raise TorchlessError(f"{kind}: {str(e).splitlines()[0][:300]}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, _tokenizer_of(tokenizer, n_vocab))
    if error and not error.startswith("WARNING"):
        raise TorchlessError(f"{kind}: {error.splitlines()[0][:300]}")
    return grammar


class ConstrainedSampler:
    """sampler(logits, history, n_prompt) -> token, only among the tokens the grammar allows
    next; the chosen token then advances the grammar."""

    def __init__(self, sampler, tokenizer, n_vocab: int, grammar):
        import llguidance

        self.sampler = sampler
        self.matcher = llguidance.LLMatcher(_tokenizer_of(tokenizer, n_vocab), grammar)

    @property
    def params(self):
        return self.sampler.params

    def __call__(self, logits: np.ndarray, history=(), n_prompt: int = 0) -> int:
        if self.matcher.is_error():
            raise TorchlessError(f"structured output: {self.matcher.get_error()}")
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), np.uint8)[:len(logits)] > 0
        masked = np.where(allowed, logits, -np.inf).astype(np.float32)
        if not np.isfinite(masked).any():
            raise TorchlessError("structured output: the grammar allows no token here")
        token = self.sampler(masked, history, n_prompt)
        if not self.matcher.consume_token(token):
            raise TorchlessError(f"structured output: token {token} left the grammar "
                                 f"({self.matcher.get_error()})")
        return token


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
