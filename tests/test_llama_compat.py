"""`torchless.Llama` against llama-cpp-python's documented `llama_cpp.Llama` API.

Every contract test runs on both backends over the same GGUF (a tiny random llama with
SmolLM2's real tokenizer, Q8_0): result keys and types, defaults, finish reasons, usage, stream
shapes, eval/scores, embeddings and errors. The cross tests put the two engines side by side:
the same token ids, prompt_tokens, greedy tokens (a disagreement is allowed only at a near tie of
the top two logits), logits and embeddings within quantization noise.

llama-cpp-python is a source build (~11 minutes on 2 cores), so it is not in the test extra:
it is imported from this python, else from the venv benchmarks/compare.py builds
(~/.cache/torchless/bench-venv); without it the llama_cpp cases skip, saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import torchless
from torchless.errors import TorchlessError

BENCH_VENV = Path.home() / ".cache" / "torchless" / "bench-venv"
N_CTX = 256  # llama.cpp rounds n_ctx up to a multiple of 256; the tiny model's context is 256
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hello."}]
NEAR_TIE = 0.05  # logits closer than this may order differently under the two engines' rounding


def _llama_cpp():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        pass
    site = BENCH_VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if (site / "llama_cpp").is_dir():
        sys.path.append(str(site))  # appended: this python's own packages still win
        try:
            import llama_cpp
            return llama_cpp
        except ImportError:
            pass
    return None


llama_cpp = _llama_cpp()
NO_LLAMA_CPP = ("llama-cpp-python is not importable here nor in ~/.cache/torchless/bench-venv "
                "(python benchmarks/compare.py builds it): the llama_cpp backend did not run")
BACKENDS = ["torchless", "llama_cpp"]
_models: dict = {}


def make(backend: str, path: Path, **kwargs):
    """One model per backend and settings, shared by the tests of this module."""
    if backend == "llama_cpp" and llama_cpp is None:
        pytest.skip(NO_LLAMA_CPP)
    key = (backend, str(path), tuple(sorted(kwargs.items())))
    if key not in _models:
        cls = torchless.Llama if backend == "torchless" else llama_cpp.Llama
        settings = dict(n_ctx=N_CTX, n_threads=1, seed=0, verbose=False)
        _models[key] = cls(model_path=str(path), **{**settings, **kwargs})
    return _models[key]


@pytest.fixture(scope="module", autouse=True)
def close_models():
    yield
    for model in _models.values():
        model.close()
    _models.clear()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def llm(backend, tiny_llama_gguf):
    return make(backend, tiny_llama_gguf)


@pytest.fixture
def llm_all(backend, tiny_llama_gguf):
    return make(backend, tiny_llama_gguf, logits_all=True)


@pytest.fixture
def both(tiny_llama_gguf):
    return make("torchless", tiny_llama_gguf), make("llama_cpp", tiny_llama_gguf)


@pytest.fixture
def both_all(tiny_llama_gguf):
    return make("torchless", tiny_llama_gguf, logits_all=True), make("llama_cpp", tiny_llama_gguf, logits_all=True)


@pytest.fixture(scope="module")
def tiny_bos_gguf(tmp_path_factory, smollm2_path) -> Path:
    """The tiny llama again, its file asking for BOS (SmolLM2's does not): add_bos matters."""
    from model_factory import make_hf_model, tokenizer_metadata_of, write_gguf

    meta = dict(tokenizer_metadata_of(smollm2_path), **{"tokenizer.ggml.add_bos_token": True})
    model = make_hf_model("llama", seed=2, vocab_size=len(meta["tokenizer.ggml.tokens"]),
                          max_position_embeddings=256, tie_word_embeddings=True)
    return write_gguf(model, tmp_path_factory.mktemp("tiny_bos") / "tiny_bos.gguf", quant="Q8_0",
                      tokenizer_metadata=meta)


def is_float(x) -> bool:
    return isinstance(x, (float, np.floating))


def no_eos(llm) -> dict:
    return {llm.token_eos(): -100.0}


# -- the contract, on each backend ---------------------------------------------------------------

def test_model_info(llm, tiny_llama_gguf):
    assert (llm.n_ctx(), llm.n_vocab(), llm.n_embd()) == (N_CTX, 49152, 64)
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)  # SmolLM2's <|im_start|>, <|im_end|>
    assert llm.model_path == str(tiny_llama_gguf)


def test_tokenize_contract(llm):
    ids = llm.tokenize(b"Hello world")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert llm.tokenize(b"<|im_start|>", special=True) == [1]
    assert len(llm.tokenize(b"<|im_start|>")) > 1  # special=False (the default): plain text
    assert llm.tokenize(b"") == []
    out = llm.detokenize([1, *ids, 2])
    assert out == b"Hello world" and isinstance(out, bytes)  # control tokens left out
    assert llm.detokenize([1, *ids, 2], special=True) == b"<|im_start|>Hello world<|im_end|>"


def test_completion_shape_and_usage(llm):
    out = llm.create_completion(PROMPT, max_tokens=3, temperature=0, logit_bias=no_eos(llm))
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert isinstance(out["created"], int) and out["model"] == llm.model_path
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3}
    assert llm(PROMPT, max_tokens=3, temperature=0, logit_bias=no_eos(llm))["choices"][0]["text"] == choice["text"]
    by_ids = llm.create_completion(llm.tokenize(PROMPT.encode()), max_tokens=3, temperature=0,
                                   logit_bias=no_eos(llm))
    assert by_ids["usage"] == out["usage"] and by_ids["choices"][0]["text"] == choice["text"]
    assert llm.create_completion(PROMPT, max_tokens=3, temperature=0, model="m")["model"] == "m"


def test_completion_defaults(llm):
    out = llm.create_completion(PROMPT, logit_bias=no_eos(llm), seed=1)  # max_tokens=16, sampled
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["finish_reason"] == "length"
    # max_tokens None or <= 0: to the end of the context
    for max_tokens in (None, 0, -1):
        usage = llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0,
                                      logit_bias=no_eos(llm))["usage"]
        assert usage["total_tokens"] == N_CTX


def test_finish_reason_stop(llm):
    eos = llm.create_completion(PROMPT, max_tokens=5, logit_bias={llm.token_eos(): 100.0})
    assert eos["choices"][0]["finish_reason"] == "stop" and eos["choices"][0]["text"] == ""
    assert eos["usage"]["completion_tokens"] == 0  # the end-of-sequence token is not counted
    text = llm.create_completion(PROMPT, max_tokens=6, temperature=0, logit_bias=no_eos(llm))["choices"][0]["text"]
    stop = text[len(text) // 2:][:3]
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=0, stop=[stop], logit_bias=no_eos(llm))
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == text[:text.index(stop)]
    assert llm.create_completion(PROMPT, max_tokens=6, temperature=0, stop=stop,
                                 logit_bias=no_eos(llm))["choices"][0]["text"] == text[:text.index(stop)]


def test_echo(llm):
    out = llm.create_completion(PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = llm.create_completion(PROMPT, max_tokens=3, temperature=0)
    assert out["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]


def test_logprobs_need_logits_all(llm):
    with pytest.raises(ValueError, match="logits_all"):
        llm.create_completion(PROMPT, max_tokens=2, logprobs=2)


def test_completion_logprobs(llm_all):
    out = llm_all.create_completion(PROMPT, max_tokens=4, temperature=0, logprobs=2, logit_bias=no_eos(llm_all))
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert all(is_float(v) and v <= 0 for v in lp["token_logprobs"])
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert token in top and 2 <= len(top) <= 3 and all(is_float(v) for v in top.values())
    n_prompt = len(PROMPT)
    assert lp["text_offset"][0] == n_prompt and lp["text_offset"] == sorted(lp["text_offset"])


def test_stream_chunks(llm):
    whole = llm.create_completion(PROMPT, max_tokens=4, temperature=0, logit_bias=no_eos(llm))
    chunks = list(llm.create_completion(PROMPT, max_tokens=4, temperature=0, stream=True,
                                        logit_bias=no_eos(llm)))
    assert len(chunks) >= 2 and len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"}  # no usage in a stream
        assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
        assert set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1]["choices"][0]["text"] == ""
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_a_ram_cache_keeps_answers_the_same(llm, backend):
    """set_cache(LlamaRAMCache(...)): a prompt that starts as an earlier one gives what it gave
    without the cache; set_cache(None) takes it away again (torchless: its default budget)."""
    ram_cache = torchless.LlamaRAMCache if backend == "torchless" else llama_cpp.LlamaRAMCache
    long_prompt = PROMPT + " Paris. The capital of Italy is Rome. The capital of Spain is"
    plain = llm(long_prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    llm.set_cache(ram_cache(capacity_bytes=1 << 26))
    try:
        assert isinstance(llm.cache, ram_cache)
        llm(long_prompt, max_tokens=6, temperature=0)
        assert llm(long_prompt, max_tokens=6, temperature=0)["choices"][0]["text"] == plain
        if backend == "torchless":
            kept = llm._llm.engine.prefix_cache
            assert kept.budget_bytes == 1 << 26 and kept.reused_tokens > 0
            with pytest.raises(torchless.TorchlessError, match="LlamaRAMCache or None"):
                llm.set_cache(object())
            llm.set_cache(ram_cache(capacity_bytes=0))
            assert kept.nbytes == 0
    finally:
        llm.set_cache(None)
    assert llm.cache is None


def test_chat_shape_and_defaults(llm):
    out = llm.create_chat_completion(CHAT, temperature=0, logit_bias=no_eos(llm))  # max_tokens=None
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == llm.model_path
    (choice,) = out["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length" and out["usage"]["total_tokens"] == N_CTX
    stopped = llm.create_chat_completion(CHAT, max_tokens=3, logit_bias={llm.token_eos(): 100.0})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 0
    assert stopped["usage"]["prompt_tokens"] == out["usage"]["prompt_tokens"]


def test_chat_stream(llm):
    whole = llm.create_chat_completion(CHAT, max_tokens=3, temperature=0, logit_bias=no_eos(llm))
    chunks = list(llm.create_chat_completion(CHAT, max_tokens=3, temperature=0, stream=True,
                                             logit_bias=no_eos(llm)))
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-")
        assert set(c["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_chat_logprobs(llm_all):
    out = llm_all.create_chat_completion(CHAT, max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=2, logit_bias=no_eos(llm_all))
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
    for c in content:
        assert {"token", "logprob", "bytes", "top_logprobs"} <= set(c) and is_float(c["logprob"])
        assert c["top_logprobs"] and all({"token", "logprob", "bytes"} <= set(t) for t in c["top_logprobs"])


def test_prompt_longer_than_context(llm):
    prompt = "x " * (N_CTX + 10)
    with pytest.raises(ValueError):
        llm.create_completion(prompt, max_tokens=1)
    with pytest.raises(ValueError):
        list(llm.create_completion(prompt, max_tokens=1, stream=True))
    with pytest.raises(ValueError):
        llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=1)


def test_missing_model_file(backend, tmp_path):
    with pytest.raises(ValueError):
        make(backend, tmp_path / "nothing.gguf")


def test_eval_and_scores(llm_all):
    llm = llm_all
    ids = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(ids[:2])
    llm.eval(ids[2:])
    assert llm.n_tokens == len(ids) and list(llm.input_ids[:len(ids)]) == ids
    assert llm.scores.shape == (N_CTX, llm.n_vocab()) and llm.scores.dtype == np.float32
    assert llm._scores.shape == (len(ids), llm.n_vocab())
    whole = llm._scores.copy()
    llm.reset()
    assert llm.n_tokens == 0
    llm.eval(ids)  # after reset: the same logits as in two pieces
    np.testing.assert_allclose(llm._scores, whole, atol=1e-3)
    greedy = llm.sample(temp=0)
    assert type(greedy) is int and greedy == int(np.argmax(whole[-1]))


def test_generate(llm_all):
    llm = llm_all
    ids = llm.tokenize(PROMPT.encode())
    gen = llm.generate(ids, temp=0)
    tokens = [next(gen) for _ in range(4)]
    gen.close()
    assert all(type(t) is int for t in tokens)
    assert llm.n_tokens == len(ids) + 3  # the last yielded token is not evaluated yet
    completion = llm.create_completion(PROMPT, max_tokens=4, temperature=0, logit_bias=no_eos(llm))
    assert llm.detokenize(tokens).decode() == completion["choices"][0]["text"]


def test_embeddings(backend, tiny_llama_gguf):
    llm = make(backend, tiny_llama_gguf, embedding=True, pooling_type=1)  # mean
    one = llm.embed("Hello world")
    assert len(one) == llm.n_embd() and all(is_float(v) for v in one)
    two = llm.embed(["Hello world", "hi"], normalize=True)
    assert len(two) == 2 and abs(np.linalg.norm(two[0]) - 1) < 1e-4
    np.testing.assert_allclose(two[0], np.array(one) / np.linalg.norm(one), atol=1e-5)
    out = llm.create_embedding(["Hello world", "hi"])
    assert set(out) == {"object", "data", "model", "usage"} and out["object"] == "list"
    assert out["model"] == llm.model_path
    assert [set(d) for d in out["data"]] == [{"object", "embedding", "index"}] * 2
    assert [d["index"] for d in out["data"]] == [0, 1] and out["data"][0]["object"] == "embedding"
    n = len(llm.tokenize(b"Hello world")) + len(llm.tokenize(b"hi"))
    assert out["usage"] == {"prompt_tokens": n, "total_tokens": n}
    per_token = make(backend, tiny_llama_gguf, embedding=True, pooling_type=0)  # none
    assert np.shape(per_token.embed("Hello world")) == (len(llm.tokenize(b"Hello world")), llm.n_embd())
    with pytest.raises(RuntimeError, match="embedding=True"):
        make(backend, tiny_llama_gguf).embed("Hello world")


# -- the two engines side by side ----------------------------------------------------------------

TEXTS = [b"Hello world", b"<|im_start|>user\nhi<|im_end|>", b"  leading spaces",
         "caf\u00e9 \u4e16\u754c \U0001f600".encode(), b"x<|endoftext|>y", b""]


@pytest.mark.parametrize("path", ["tiny", "tiny_bos"])
def test_same_tokenizer(path, tiny_llama_gguf, request):
    gguf = tiny_llama_gguf if path == "tiny" else request.getfixturevalue("tiny_bos_gguf")
    ours, theirs = make("torchless", gguf), make("llama_cpp", gguf)
    for text in TEXTS:
        for add_bos in (True, False):
            for special in (True, False):
                assert ours.tokenize(text, add_bos, special) == theirs.tokenize(text, add_bos, special), \
                    (text, add_bos, special)
        ids = theirs.tokenize(text, special=True)
        for special in (True, False):
            assert ours.detokenize(ids, special=special) == theirs.detokenize(ids, special=special)
    assert (ours.n_ctx(), ours.n_vocab(), ours.token_bos(), ours.token_eos(), ours.n_embd()) == \
        (theirs.n_ctx(), theirs.n_vocab(), theirs.token_bos(), theirs.token_eos(), theirs.n_embd())
    if path == "tiny_bos":
        assert ours.tokenize(b"hi")[0] == 1 and ours.tokenize(b"hi", add_bos=False)[0] != 1


def test_same_usage(both):
    completions = [llm.create_completion(PROMPT, max_tokens=3, temperature=0)["usage"] for llm in both]
    assert completions[0] == completions[1]
    chats = [llm.create_chat_completion(CHAT, max_tokens=2, logit_bias=no_eos(llm))["usage"] for llm in both]
    assert chats[0] == chats[1]


def _first_disagreement(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_same_logits_and_greedy_tokens(both_all):
    """Teacher-forced on llama.cpp's greedy tokens: the log-softmax rows agree within Q8_0's
    rounding, and every greedy choice agrees unless the top two logits are a near tie."""
    ours, theirs = both_all
    prompt = theirs.tokenize(PROMPT.encode())
    gen = theirs.generate(prompt, temp=0)
    tokens = [next(gen) for _ in range(12)]
    gen.close()
    for llm in both_all:
        llm.reset()
        llm.eval(prompt + tokens)
    a = torchless.Llama.logits_to_logprobs(ours._scores)
    b = torchless.Llama.logits_to_logprobs(theirs._scores)
    assert np.abs(a - b).max() < 0.25, np.abs(a - b).max()
    rows = ours._scores[len(prompt) - 1:-1]
    for row, token in zip(rows, tokens):
        if int(np.argmax(row)) != token:
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] < NEAR_TIE and row[token] >= top2[0] - 1e-6

    gen = ours.generate(prompt, temp=0)
    ours_tokens = [next(gen) for _ in range(12)]
    gen.close()
    at = _first_disagreement(ours_tokens, tokens)
    outs = [llm.create_completion(PROMPT, max_tokens=12, temperature=0, logit_bias=no_eos(llm))
            for llm in both_all]
    if at is None:
        assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]
    else:  # only at a near tie (teacher forcing checked the row above)
        top2 = np.sort(rows[at])[-2:]
        assert top2[1] - top2[0] < NEAR_TIE, (at, outs)
    assert outs[0]["usage"] == outs[1]["usage"]


def test_same_completion_logprobs(both_all):
    outs = [llm.create_completion(PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                  logit_bias=no_eos(llm)) for llm in both_all]
    lps = [o["choices"][0]["logprobs"] for o in outs]
    if outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]:
        assert lps[0]["tokens"] == lps[1]["tokens"] and lps[0]["text_offset"] == lps[1]["text_offset"]
        np.testing.assert_allclose(np.array(lps[0]["token_logprobs"], float),
                                   np.array(lps[1]["token_logprobs"], float), atol=0.1)


def test_same_embeddings(tiny_llama_gguf):
    vecs = [np.array(make(b, tiny_llama_gguf, embedding=True, pooling_type=1).embed(
        ["Hello world", "The capital of France is"], normalize=True)) for b in BACKENDS]
    assert vecs[0].shape == vecs[1].shape
    cos = (vecs[0] * vecs[1]).sum(1)
    assert cos.min() > 0.99, cos


# -- what torchless cannot do says so ------------------------------------------------------------

def test_refusals_are_one_line(tiny_llama_gguf):
    cases = [lambda: torchless.Llama(str(tiny_llama_gguf), lora_path="adapter.gguf", verbose=False),
             lambda: torchless.Llama(str(tiny_llama_gguf), rope_freq_base=1e6, verbose=False),
             lambda: torchless.Llama(str(tiny_llama_gguf), chat_format="llama-2", verbose=False),
             lambda: torchless.Llama(str(tiny_llama_gguf), no_such_argument=1, verbose=False),
             lambda: make("torchless", tiny_llama_gguf).create_completion(PROMPT, suffix="!"),
             lambda: make("torchless", tiny_llama_gguf).create_completion(PROMPT, mirostat_mode=2),
             lambda: make("torchless", tiny_llama_gguf).sample(typical_p=0.5)]
    for case in cases:
        with pytest.raises(TorchlessError) as info:
            case()
        assert "\n" not in str(info.value)


def test_n_threads_holds_on_whichever_thread_calls_and_leaves_the_callers_own(tiny_llama_gguf):
    """numba's thread count is per thread: n_threads must reach the model from a thread that
    did not make the Llama (a web server's workers, say), and must not stay set on the caller."""
    import threading

    import numba

    most = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(most)
    llm = torchless.Llama(str(tiny_llama_gguf), n_ctx=N_CTX, n_threads=1, verbose=False)
    assert llm.n_threads == 1 and numba.get_num_threads() == most  # the maker's count untouched
    seen, submit, prefill = [], llm._llm.runner.submit, llm._llm.model.prefill
    llm._llm.runner.submit = lambda tag, spans: seen.append(numba.get_num_threads()) or submit(tag, spans)
    llm._llm.model.prefill = lambda *a, **k: seen.append(numba.get_num_threads()) or prefill(*a, **k)

    def calls():  # a new thread starts at numba's whole pool
        llm.create_completion(PROMPT, max_tokens=2, temperature=0)
        for _ in llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, stream=True):
            pass
        llm.eval(llm.tokenize(b"Hello"))
        seen.append(("after", numba.get_num_threads()))
    worker = threading.Thread(target=calls)
    worker.start()
    worker.join()
    assert seen[-1] == ("after", most) and set(seen[:-1]) == {1} and len(seen) >= 3, seen
    llm.close()
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(TorchlessError, match="n_threads must be a positive integer"):
            torchless.Llama(str(tiny_llama_gguf), n_ctx=N_CTX, n_threads=bad, verbose=False)


def test_gpu_offload_is_accepted_and_said(tiny_llama_gguf, capsys):
    llm = torchless.Llama(str(tiny_llama_gguf), n_ctx=N_CTX, n_gpu_layers=-1, verbose=True)
    err = capsys.readouterr().err
    assert "n_gpu_layers=-1 ignored" in err and err.count("ignored") == 1
    assert llm.create_completion(PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
    torchless.Llama(str(tiny_llama_gguf), n_ctx=N_CTX, n_gpu_layers=-1, verbose=False)
    assert "ignored" not in capsys.readouterr().err


def test_chatml_format(tiny_llama_gguf):
    llm = torchless.Llama(str(tiny_llama_gguf), n_ctx=N_CTX, chat_format="chatml", verbose=False)
    out = llm.create_chat_completion(CHAT, max_tokens=1, temperature=0)
    # SmolLM2's template adds a default system turn; ChatML alone does not
    plain = make("torchless", tiny_llama_gguf).create_chat_completion(CHAT, max_tokens=1, temperature=0)
    assert out["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]


def test_from_pretrained(tiny_llama_gguf, monkeypatch):
    from torchless import hub

    asked = []
    monkeypatch.setattr(hub, "resolve_model", lambda ref: asked.append(ref) or tiny_llama_gguf)
    llm = torchless.Llama.from_pretrained("org/repo", "tiny.gguf", n_ctx=N_CTX, verbose=False)
    assert asked[0] == "org/repo:tiny.gguf" and llm.model_path == str(tiny_llama_gguf)


def test_hidden_states_give_the_logits(tiny_llama_gguf):
    """The embeddings hook: the LM head of Mistral.hidden_states' rows is prefill's logits."""
    model = make("torchless", tiny_llama_gguf)._llm.model
    ids = make("torchless", tiny_llama_gguf).tokenize(PROMPT.encode())
    hidden = model.hidden_states(model.new_state(len(ids)), ids, chunk_size=3)  # two chunks
    logits = model.prefill(model.new_state(len(ids)), ids, all_logits=True)
    assert hidden.shape == (len(ids), model.config.hidden_size)
    np.testing.assert_allclose(model.output(hidden, True, model.work), logits, rtol=1e-4, atol=1e-4)
