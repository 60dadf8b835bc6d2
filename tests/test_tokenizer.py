"""Tokenizer and chat template, against independent oracles.

- SmolLM2's GGUF (byte-level BPE, `smollm` split): transformers' own GGUF tokenizer conversion.
- A SentencePiece BPE model trained here with byte fallback, written to a GGUF as llama.cpp
  would: `sentencepiece` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchless.chat_template import CHATML_TEMPLATE, render_chat_template
from torchless.errors import TorchlessError, UnsupportedModelError
from torchless.tokenizer import Tokenizer

CORPUS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "I'm sure you're right, they'll see we've done what he'd said.",
    "Numbers: 0 7 42 1234567890 3.14159 -2,718,281 1e-9 0x1F 2024-05-17",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n",
    "Punctuation!!! ??? ... --- ((( ))) [[]] {{}} @#$%^&*_+=|\\/<>~`",
    "   leading spaces, trailing spaces   ",
    "runs  of   spaces\n\n\nnewlines\t\ttabs \t mixed\r\nCRLF \n \n",
    "Accents: café naïve résumé façade Ångström Øresund Straße ğüşıöç",
    "中文测试：你好，世界。日本語のテキスト。한국어 텍스트.",
    "Emoji: 🤖👍🏽🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Mixed123abc ABC_def-ghi.JKL",
    "",
    " ",
    "\n",
    "a",
]
CHAT_TEXT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def gguf_tokenizer_metadata(path) -> dict:
    """The tokenizer.* metadata of a GGUF file as the plain dict `from_gguf_metadata` takes."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[1] == gguf.GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[key] = np.array([field.parts[i][0] for i in field.data])
        else:
            out[key] = field.contents()
    return out


# ---- SmolLM2 (gpt2 byte-level BPE) ------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_meta(smollm2_path):
    return gguf_tokenizer_metadata(smollm2_path)


@pytest.fixture(scope="session")
def smol(smollm2_meta):
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.fixture(scope="session")
def hf_smol(smollm2_path):
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", CORPUS + [CHAT_TEXT])
def test_smollm2_ids_match_transformers(smol, hf_smol, text):
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)


def test_smollm2_whole_corpus_at_once(smol, hf_smol):
    text = CHAT_TEXT.join(CORPUS)
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)


def test_smollm2_special_false_reads_specials_as_text(smol, hf_smol):
    ids = smol.encode(CHAT_TEXT, special=False)
    assert ids == hf_smol(CHAT_TEXT, add_special_tokens=False, split_special_tokens=True).input_ids
    im_start, im_end = smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")
    assert im_start not in ids and im_end not in ids
    assert im_start in smol.encode(CHAT_TEXT) and im_end in smol.encode(CHAT_TEXT)
    assert smol.decode(ids) == CHAT_TEXT


def test_smollm2_bos_eos_rules(smol, hf_smol, smollm2_meta):
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.add_bos is False and smol.add_eos is False
    assert smol.eos_ids == {2}
    assert smol.encode("hi") == hf_smol.encode("hi")  # the file's rule: no BOS
    assert smol.encode("hi", add_bos=True) == [1] + smol.encode("hi")
    assert smol.vocab_size == len(smollm2_meta["tokenizer.ggml.tokens"]) == 49152
    assert smol.id_to_token(smol.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert smol.token_to_id("no such token at all") is None
    with pytest.raises(TorchlessError):
        smol.id_to_token(10**6)


@pytest.mark.parametrize("skip", [False, True])
def test_smollm2_decode_matches_transformers(smol, hf_smol, skip):
    for text in CORPUS + [CHAT_TEXT]:
        ids = smol.encode(text, add_bos=True)
        expected = hf_smol.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert smol.decode(ids, skip_special=skip) == expected
        if not skip:
            assert smol.decode(ids) == smol.bos_token + text


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smol, hf_smol, messages, add_generation_prompt):
    expected = hf_smol.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    assert smol.apply_chat_template(messages, add_generation_prompt) == expected
    assert smol.chat_template is not None


@pytest.mark.parametrize("pre", ["default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2",
                                 "tekken", "mistral"])
def test_every_known_pre_tokenizer_builds_and_round_trips(smollm2_meta, pre):
    tok = Tokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": pre})
    for text in CORPUS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("pre, words", [
    ("smollm", ["1", "2", "3", "4", "5", "Ġabc", "'s", "!!", "ĠÄŁ"]),
    ("gpt2", ["12345", "Ġabc", "'s", "!!", "ĠÄŁ"]),
    ("llama-bpe", ["123", "45", "Ġabc", "'s", "!!", "ĠÄŁ"]),
    ("qwen2", ["1", "2", "3", "4", "5", "Ġabc", "'s", "!!", "ĠÄŁ"]),
])
def test_pre_tokenizer_splits(smollm2_meta, pre, words):
    tok = Tokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": pre})
    got = [w for w, _ in tok._backend.pre_tokenizer.pre_tokenize_str("12345 abc's!! ğ")]
    assert got == words


def test_llama3_family_adds_bos_unless_told(smollm2_meta):
    meta = {k: v for k, v in smollm2_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos is True
    assert Tokenizer.from_gguf_metadata(meta).add_bos is False


def test_unknown_pre_tokenizer_warns_and_falls_back(smollm2_meta):
    with pytest.warns(UserWarning, match="pre-tokenizer"):
        tok = Tokenizer.from_gguf_metadata({**smollm2_meta, "tokenizer.ggml.pre": "nonesuch"})
    assert tok.decode(tok.encode("Hello, world 123!")) == "Hello, world 123!"


def test_unknown_tokenizer_model_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="wordpiece"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "wordpiece",
                                      "tokenizer.ggml.tokens": ["a"]})


def test_from_tokenizer_json_matches_gguf(smol, hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    tok = Tokenizer.from_tokenizer_json(tmp_path)
    for text in CORPUS + [CHAT_TEXT]:
        assert tok.encode(text) == hf_smol.encode(text)
        assert tok.encode(text, special=False) == smol.encode(text, special=False)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.apply_chat_template(MESSAGES[1]) == smol.apply_chat_template(MESSAGES[1])


# ---- streaming --------------------------------------------------------------------------------

def _stream(tok, ids, skip_special=False):
    dec = tok.stream_decoder(skip_special)
    chunks = [dec.push(i) for i in ids]
    return chunks, dec.flush()


def test_stream_never_splits_a_character(smol):
    text = "é中🤖👨‍👩‍👧 done"
    ids = smol.encode(text)
    assert any("\ufffd" in smol.decode([i]) for i in ids)  # some ids really are partial characters
    chunks, rest = _stream(smol, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + rest == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=40) | st.lists(st.integers(0, 600), max_size=40),
       st.booleans())
def test_stream_concatenation_equals_decode_smollm2(smol, ids, skip_special):
    chunks, rest = _stream(smol, ids, skip_special)
    assert "".join(chunks) + rest == smol.decode(ids, skip_special=skip_special)


# ---- SentencePiece-style (llama) vocabulary ---------------------------------------------------

SPM_TRAINING = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "Machine learning models process text as sequences of tokens, not characters or words.",
    "A tokenizer splits sentences into pieces; each piece maps to an integer identifier.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers like 12, 345 and 6789 appear in tables, dates such as 2024-01-31 and prices $9.99.",
    "Café au lait, crème brûlée and naïve façades are common in French texts.",
]


SPM_USER_DEFINED = ["<tool>"]  # the Python API cannot tell these apart from normal pieces


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A SentencePiece BPE model with byte fallback, trained on a small corpus."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    # Enough distinct text for a few hundred merges: the standard library's own docs.
    import json as _json, textwrap as _textwrap, argparse as _argparse
    docs = [(m.__doc__ or "") for m in (_json, _textwrap, _argparse)]
    corpus.write_text("\n".join(SPM_TRAINING * 20 + docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "m"), model_type="bpe", vocab_size=700,
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=SPM_USER_DEFINED, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_file=str(root / "m.model"))


def _spm_gguf(sp, path, **overrides) -> Path:
    """Write `sp`'s vocabulary to a GGUF the way llama.cpp's converter does."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 4 if tokens[-1] in SPM_USER_DEFINED else 1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    for name, value in overrides.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def spm_tok(spm_model, tmp_path_factory):
    path = _spm_gguf(spm_model, tmp_path_factory.mktemp("spm_gguf") / "spm.gguf")
    return Tokenizer.from_gguf_metadata(gguf_tokenizer_metadata(path))


SPM_CORPUS = CORPUS + ["the lazy dog", "unseen wörds: ж щ ю 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \x00\x07 controls",
                       "Ωmega ∑ ∫ √2 ≈ 1.414"]


@pytest.mark.parametrize("text", SPM_CORPUS)
def test_spm_ids_match_sentencepiece(spm_model, spm_tok, text):
    # sentencepiece never parses control tokens in text, so compare with special=False.
    assert spm_tok.encode(text, add_bos=False, special=False) == spm_model.encode(text)


def test_spm_really_falls_back_to_bytes(spm_model, spm_tok):
    ids = spm_tok.encode("ж🤖", add_bos=False)
    assert all(spm_tok.id_to_token(i).startswith("<0x") for i in ids[1:])
    assert spm_tok.decode(ids) == "ж🤖"


@pytest.mark.parametrize("text", SPM_CORPUS)
def test_spm_decode_matches_sentencepiece(spm_model, spm_tok, text):
    ids = spm_tok.encode(text)
    assert ids[0] == spm_tok.bos_id  # llama vocabularies add BOS by default
    assert spm_tok.decode(ids, skip_special=True) == spm_model.decode(ids[1:])


def test_spm_specials_parse_and_prefix_a_space_after_them(spm_model, spm_tok):
    bos, eos = spm_tok.bos_id, spm_tok.eos_id
    assert spm_tok.encode("<s>hi there</s>", add_bos=False) == [bos] + spm_model.encode("hi there") + [eos]
    assert bos not in spm_tok.encode("<s>hi", add_bos=False, special=False)
    # User-defined pieces match whole even with special=False; like any token in the text, they
    # make llama.cpp prefix the following text with a space (sentencepiece would not).
    tool = spm_tok.token_to_id("<tool>")
    assert spm_tok.encode("use <tool> here", add_bos=False, special=False) == (
        spm_model.encode("use ") + [tool] + spm_model.encode(" here"))
    assert spm_tok.decode([bos] + spm_model.encode("Hello")) == "<s> Hello"


def test_spm_flags_from_metadata(spm_model, tmp_path):
    path = _spm_gguf(spm_model, tmp_path / "flags.gguf", add_bos_token=False, add_eos_token=True,
                     eot_token_id=5, add_space_prefix=False)
    tok = Tokenizer.from_gguf_metadata(gguf_tokenizer_metadata(path))
    assert tok.add_bos is False and tok.add_eos is True
    assert tok.eos_ids == {spm_model.eos_id(), 5}
    ids = tok.encode("hello world")
    assert ids[-1] == tok.eos_id and tok.bos_id not in ids
    assert tok.decode(ids[:-1]) == "hello world"
    assert tok.id_to_token(ids[0]) != "\u2581hello"  # no dummy prefix this time
    assert tok.chat_template is None


def test_spm_stream_strips_only_the_first_space(spm_tok):
    text = " two  spaces, 中文 and 🤖"
    ids = spm_tok.encode(text, add_bos=False)
    chunks, rest = _stream(spm_tok, ids)
    assert "".join(chunks) + rest == spm_tok.decode(ids) == text  # one dummy space removed
    assert all("\ufffd" not in c for c in chunks)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.booleans())
def test_stream_concatenation_equals_decode_spm(spm_tok, data, skip_special):
    # Weight toward byte tokens (3..258), where characters get split.
    ids = data.draw(st.lists(st.integers(0, 40) | st.integers(3, 258) | st.integers(0, spm_tok.vocab_size - 1),
                             max_size=30))
    chunks, rest = _stream(spm_tok, ids, skip_special)
    assert "".join(chunks) + rest == spm_tok.decode(ids, skip_special=skip_special)


def test_spm_tokenizer_json_matches_transformers(spm_model, tmp_path):
    """transformers' GGUF conversion, saved as tokenizer.json, read back by from_tokenizer_json.

    Its Metaspace(prepend_scheme="first") differs from sentencepiece/llama.cpp only for text that
    starts with a space or follows a special token, so the comparison leaves those out."""
    transformers = pytest.importorskip("transformers")
    _spm_gguf(spm_model, tmp_path / "spm.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_tokenizer_json(tmp_path / "hf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (spm_model.bos_id(), spm_model.eos_id(), True)
    for text in SPM_CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):
            assert ids == hf.encode(text) == [spm_model.bos_id()] + spm_model.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips_and_streams(spm_tok, smol, text):
    for tok in (spm_tok, smol):
        ids = tok.encode(text, add_bos=False, special=False)
        chunks, rest = _stream(tok, ids)
        assert "".join(chunks) + rest == tok.decode(ids)
        if "\ufffd" not in tok.decode(ids):
            assert all("\ufffd" not in c for c in chunks)
    assert spm_tok.decode(spm_tok.encode(text, special=False), skip_special=True) == text  # bytes cover all
    # SmolLM2's vocabulary lacks a few bytes (0xF1, some controls); BPE drops those, as HF does.
    spelled = "".join(w for w, _ in smol._backend.pre_tokenizer.pre_tokenize_str(text))
    if all(smol.token_to_id(c) is not None for c in spelled):
        assert smol.decode(smol.encode(text, special=False)) == text


# ---- chat template ----------------------------------------------------------------------------

def test_chatml_fallback():
    out = render_chat_template(None, MESSAGES[0])
    assert out == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_template(CHATML_TEMPLATE, MESSAGES[0], add_generation_prompt=False) == out[:-len("<|im_start|>assistant\n")]


def test_template_gets_tokens_extras_and_tojson():
    template = "{{ bos_token }}{{ messages | tojson }}{{ tools | tojson }}{{ eos_token }}"
    out = render_chat_template(template, [{"role": "user", "content": "é"}], bos_token="<s>",
                               eos_token="</s>", tools=[{"name": "f"}])
    assert out == '<s>' + json.dumps([{"role": "user", "content": "é"}], ensure_ascii=False) + '[{"name": "f"}]</s>'


@pytest.mark.parametrize("messages", [
    "hi", [["user", "hi"]], [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": 3}],
    [{"role": None, "content": "hi"}],
])
def test_invalid_messages_are_user_errors(messages):
    with pytest.raises(TorchlessError, match="message"):
        render_chat_template(None, messages)


def test_template_errors_are_user_errors():
    with pytest.raises(TorchlessError, match="only user"):
        render_chat_template("{{ raise_exception('only user') }}", MESSAGES[0])
    with pytest.raises(TorchlessError):
        render_chat_template("{% for %}", MESSAGES[0])
    with pytest.raises(TorchlessError):  # the sandbox holds
        render_chat_template("{{ ''.__class__.__mro__ }}{{ messages.append(1) }}", MESSAGES[0])
