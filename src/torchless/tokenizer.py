"""Text <-> token ids, from GGUF metadata or a Hugging Face `tokenizer.json`.

Encoding is done by the `tokenizers` library, configured from the metadata to behave like
llama.cpp (the reference for what a GGUF means). Decoding is ours: each id maps to the bytes it
stands for, so whole-sequence decoding and streaming are the same computation and agree exactly.
"""

from __future__ import annotations

import codecs
import json
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers

from .chat_template import render_chat_template
from .config import flag, integer, text
from .errors import ModelFileError, TorchlessError, UnsupportedModelError, shown

# llama.cpp's token types (tokenizer.ggml.token_type).
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp applies them: each regex in turn
# cuts every piece the previous one left, keeping matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "smaug-bpe",
                 "dbrx")
_PRE_SPLITS = {
    "default": _DEFAULT,
    **{name: [_GPT2] for name in ("gpt2", "mpt", "olmo", "jais")},
    **{name: [r"\p{N}", _GPT2] for name in ("smollm", "starcoder", "refact", "command-r",
                                            "codeshell", "exaone", "minerva")},
    **{name: [_LLAMA3] for name in _LLAMA3_NAMES},
    **{name: [_QWEN2] for name in ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez")},
    "tekken": [_TEKKEN],
    "mistral": [_TEKKEN],
}
# llama.cpp takes a whole pre-tokenized word that is itself a token before trying merges for these,
# and adds BOS unless the file says otherwise.
_IGNORE_MERGES = set(_LLAMA3_NAMES) | {"tekken", "mistral"}

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    # A character outside the alphabet is not a spelled byte; keep it as the text it is.
    return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode()
                    for c in token)


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode()


class Tokenizer:
    """Encode text to ids and decode ids to text, with the model's special tokens and rules."""

    def __init__(self, backend: tokenizers.Tokenizer, tokens: list[str], pieces: list[bytes],
                 special_ids: set[int], *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, add_eos: bool = False, eos_ids=(), chat_template: str | None = None,
                 strip_leading_space: bool = False):
        self._backend = backend
        self._tokens = tokens
        self._pieces = pieces
        self._special_ids = frozenset(special_ids)
        self._ids = {token: i for i, token in enumerate(tokens)}
        # Whether specials are matched is a switch on the shared backend; flip and use it atomically.
        self._lock = threading.Lock()
        self._strip_leading_space = strip_leading_space
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.eos_ids = frozenset(i for i in (eos_id, *eos_ids) if i is not None)
        self.chat_template = chat_template

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        kind = metadata.get("tokenizer.ggml.model")
        if not isinstance(kind, str) or kind not in ("gpt2", "llama"):  # an array is unhashable
            raise UnsupportedModelError(f"unsupported tokenizer model {kind!r} "
                                        "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        tokens = _strings(_required(metadata, "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
        types = _numbers(metadata.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL)),
                         "tokenizer.ggml.token_type", "iu")
        if len(types) != len(tokens):
            raise ModelFileError(f"tokenizer metadata: {len(tokens)} tokens but {len(types)} types")

        def token_id(key):
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            value = integer(value, f"tokenizer.ggml.{key}", minimum=-2**63)
            return value if 0 <= value < len(tokens) else None  # llama.cpp ignores such an id too

        def setting(key, read, default):
            value = metadata.get(f"tokenizer.ggml.{key}")
            return default if value is None else read(value, f"tokenizer.ggml.{key}")

        vocab = {token: i for i, token in enumerate(tokens)}
        if kind == "gpt2":
            pre = setting("pre", text, "default")
            if pre not in _PRE_SPLITS:
                warnings.warn(f"unknown pre-tokenizer {pre!r}; using llama.cpp's default split",
                              stacklevel=2)
            merges = _strings(_required(metadata, "tokenizer.ggml.merges"), "tokenizer.ggml.merges")
            bad = next((i for i, m in enumerate(merges) if m.count(" ") != 1), None)
            if bad is not None:
                raise ModelFileError(f"tokenizer.ggml.merges[{bad}] {shown(merges[bad])} is not two "
                                     "tokens separated by one space")
            backend = tokenizers.Tokenizer(_library_call(lambda: models.BPE(
                vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=pre in _IGNORE_MERGES)))
            splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
                      for r in _PRE_SPLITS.get(pre, _DEFAULT)]
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            pieces = [t.encode() if ty in (CONTROL, USER_DEFINED, UNKNOWN) else _byte_level_bytes(t)
                      for t, ty in zip(tokens, types)]
            default_add_bos, strip = pre in _IGNORE_MERGES, False
        else:
            scores = _numbers(metadata.get("tokenizer.ggml.scores", np.zeros(len(tokens))),
                              "tokenizer.ggml.scores", "iuf")
            if len(scores) != len(tokens):
                raise ModelFileError(f"tokenizer metadata: {len(tokens)} tokens but {len(scores)} scores")
            unk = token_id("unknown_token_id")
            backend = tokenizers.Tokenizer(_library_call(lambda: models.BPE(
                vocab, _merges_from_scores(tokens, types, scores), byte_fallback=True, fuse_unk=True,
                unk_token=tokens[unk] if unk is not None else None)))
            # llama.cpp prefixes a space to every run of text, including each one after a special
            # token; a normalizer runs per run, where Metaspace would only prefix the first.
            replace = normalizers.Replace(" ", "\u2581")
            prefix = setting("add_space_prefix", flag, True)
            backend.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
                                  if prefix else replace)
            pieces = [t.encode() if ty in (CONTROL, UNKNOWN) else _sentencepiece_bytes(t)
                      for t, ty in zip(tokens, types)]
            default_add_bos, strip = True, prefix

        special = {i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN) and tokens[i]}
        _library_call(lambda: backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]))
        _library_call(lambda: backend.add_tokens([AddedToken(t, special=False, normalized=False)
                                             for t, ty in zip(tokens, types) if ty == USER_DEFINED and t]))
        template = metadata.get("tokenizer.chat_template")
        return cls(backend, tokens, pieces, special, bos_id=token_id("bos_token_id"),
                   eos_id=token_id("eos_token_id"), add_bos=setting("add_bos_token", flag, default_add_bos),
                   add_eos=setting("add_eos_token", flag, False),
                   eos_ids=(token_id("eot_token_id"), token_id("eom_token_id")),
                   chat_template=None if template is None else _strings([text(
                       template, "tokenizer.chat_template")], "tokenizer.chat_template")[0],
                   strip_leading_space=strip)

    @classmethod
    def from_tokenizer_json(cls, path, config: dict | None = None) -> Tokenizer:
        """From a Hugging Face `tokenizer.json` (or its folder); `config` is `tokenizer_config.json`,
        read from the same folder when not given."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        folder = file.parent
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
            backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as exc:  # OSError, bad JSON, or the plain Exception the Rust side raises
            raise TorchlessError(f"{file}: cannot read tokenizer: {exc}") from None
        if config is None:
            config = _read_json(folder / "tokenizer_config.json") or {}
        if not isinstance(config, dict):
            raise ModelFileError(f"{folder / 'tokenizer_config.json'}: must hold a JSON object, "
                                 f"got {shown(config)}")

        decoder_types = set(_types_in(spec.get("decoder")))
        if "ByteLevel" in decoder_types:
            spell = _byte_level_bytes
        elif decoder_types & {"ByteFallback", "Replace", "Metaspace"}:
            spell = _sentencepiece_bytes
        else:
            raise UnsupportedModelError(
                f"{file}: unsupported tokenizer decoder {sorted(decoder_types)}")
        strip = _strips_leading_space(spec.get("decoder"))

        # Ids may have gaps (left empty here) but must stay near the number of tokens.
        ids = backend.get_vocab(with_added_tokens=True).values()
        size = max(ids, default=-1) + 1
        if size > 2 * len(ids) + 1024:
            raise ModelFileError(f"{file}: token ids run to {size - 1} for {len(ids)} tokens")
        tokens = [backend.id_to_token(i) or "" for i in range(size)]
        added = backend.get_added_tokens_decoder()
        pieces = [added[i].content.encode() if i in added else spell(t) for i, t in enumerate(tokens)]
        special = {i for i, tok in added.items() if tok.special}

        def named_id(name):
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if not isinstance(value, str):
                return None
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate, which the library cannot look up
                raise ModelFileError(
                    f"{folder / 'tokenizer_config.json'}: {name} {value!r} is not valid text") from None
            return backend.token_to_id(value)

        bos_id, eos_id = named_id("bos_token"), named_id("eos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the file's post-processor is then the rule
            empty = _library_call(lambda: backend.encode("", add_special_tokens=True))
            add_bos = bos_id is not None and empty.ids[:1] == [bos_id]
        eos_ids = set()
        for name in ("generation_config.json", "config.json"):
            extra = _read_json(folder / name)
            extra = extra.get("eos_token_id") if isinstance(extra, dict) else None
            extra = extra if isinstance(extra, list) else [extra]
            eos_ids |= {integer(i, f"{name} eos_token_id", minimum=0) for i in extra if i is not None}
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = _read_text(folder / "chat_template.jinja")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        return cls(backend, tokens, pieces, special, bos_id=bos_id, eos_id=eos_id,
                   add_bos=flag(add_bos, "tokenizer_config.json add_bos_token"),
                   add_eos=flag(config.get("add_eos_token", False), "tokenizer_config.json add_eos_token"),
                   eos_ids=eos_ids, strip_leading_space=strip,
                   chat_template=None if template is None else text(template, "chat_template"))

    # ---- vocabulary ---------------------------------------------------------------------------

    def backend_json(self) -> str:
        """The `tokenizers` library's JSON of this tokenizer (what llguidance builds from)."""
        return self._backend.to_str()

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (maybe part of a UTF-8 character)."""
        return self._piece(token_id, False)

    @property
    def bos_token(self) -> str:
        return self._tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self._tokens[self.eos_id] if self.eos_id is not None else ""

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the file; `special=False` reads control
        tokens such as `<|im_start|>` as plain text (user-defined tokens still match, as in llama.cpp)."""
        if not isinstance(text, str):
            raise TorchlessError(f"can only tokenize str, got {type(text).__name__}")
        with self._lock:
            self._backend.encode_special_tokens = not special
            try:
                ids = self._backend.encode(text, add_special_tokens=False).ids
            except TypeError:  # the library's answer to a lone surrogate such as "\ud800"
                raise TorchlessError("cannot tokenize text that is not valid Unicode "
                                     f"(a lone surrogate in {shown(text)})") from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        stream = self.stream_decoder(skip_special)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def _piece(self, token_id: int, skip_special: bool) -> bytes:
        self._check_id(token_id)
        return b"" if skip_special and token_id in self._special_ids else self._pieces[token_id]

    def _check_id(self, token_id) -> None:
        if not 0 <= int(token_id) < len(self._tokens):
            raise TorchlessError(f"token id {token_id} out of range (vocabulary of {len(self._tokens)})")

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """The prompt text for `messages` (the model's template, or ChatML if it has none)."""
        return render_chat_template(self.chat_template, messages, bos_token=self.bos_token,
                                    eos_token=self.eos_token,
                                    add_generation_prompt=add_generation_prompt, **extra)


class StreamDecoder:
    """Decodes ids one at a time, returning only complete characters.

    An id may stand for part of a UTF-8 character (`<0xE4>`, or a byte-level BPE piece), so bytes
    wait in an incremental UTF-8 decoder until the character is whole. All pushes plus `flush()`
    equal `Tokenizer.decode` of the same ids, which is built on this class.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece marks the start of text with a space that is not part of it: drop the
        # first character of the output if it is that space.
        self._strip_pending = tokenizer._strip_leading_space

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self._tokenizer._piece(token_id, self._skip_special)))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character comes out as U+FFFD)."""
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text

    def _emit(self, text: str) -> str:
        if text and self._strip_pending:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text


def _required(metadata: dict, key: str):
    if key not in metadata:
        raise ModelFileError(f"tokenizer metadata has no {key!r}")
    return metadata[key]


def _strings(value, key: str) -> list[str]:
    """A GGUF array of strings, each valid UTF-8 (the tokenizers library takes nothing else)."""
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ModelFileError(f"{key} must be an array of strings, got {shown(value)}")
    try:
        "".join(value).encode("utf-8")
    except UnicodeEncodeError:  # the reader kept bytes that are not UTF-8 as surrogates
        for i, s in enumerate(value):
            if not s.isascii() and any("\udc80" <= c <= "\udcff" for c in s):
                raise ModelFileError(f"{key}[{i}] {shown(s)} is not valid UTF-8") from None
    return value


def _numbers(value, key: str, kinds: str) -> list:
    """A GGUF array of numbers of the NumPy kinds `kinds` ("iu": integers, "iuf": any), finite."""
    array = np.asarray(value) if isinstance(value, (list, np.ndarray)) else None
    if not (array is not None and array.ndim == 1 and array.dtype.kind in kinds
            and (array.dtype.kind != "f" or np.isfinite(array).all())):
        raise ModelFileError(f"{key} must be an array of finite numbers, got {shown(value)}")
    return array.tolist()


def _library_call(call):
    """A call into the tokenizers library, which raises TypeError or a bare Exception with a
    many-line message on a vocabulary it cannot take."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the library's exception types are not exported
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"tokenizer: the vocabulary or merges are corrupt ({reason})") from None


def _merges_from_scores(tokens, types, scores) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule: merge the adjacent pair whose union is the
    best-scoring piece. Every split of a piece into two pieces is a merge ranked by its score."""
    mergeable = {t for t, ty in zip(tokens, types) if ty in (NORMAL, USER_DEFINED, UNDEFINED)}
    ranked = []
    for i, (token, ty) in enumerate(zip(tokens, types)):
        if token not in mergeable or len(token) < 2:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _nodes(node):
    """A decoder spec and, for a Sequence, its parts, as JSON dicts."""
    if isinstance(node, dict):
        yield node
        for child in node.get("decoders") or ():
            yield from _nodes(child)


def _types_in(node):
    return (n.get("type") for n in _nodes(node))


def _strips_leading_space(decoder) -> bool:
    """Whether a decoder drops the space SentencePiece puts before the first word."""
    for node in _nodes(decoder):
        if node.get("type") == "Strip" and node.get("start", 0) > 0:
            return True
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never" \
                and node.get("add_prefix_space", True):
            return True
    return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: {exc}") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path)) if path.is_file() else None
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: {type(exc).__name__}: {exc}") from None
