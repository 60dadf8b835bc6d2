"""LLM end to end: OpenAI result shapes, streaming == non-streaming, stop strings, limits, errors."""

from __future__ import annotations

import pytest

from torchless.api import LLM
from torchless.errors import ContextOverflowError, TorchlessError
from torchless.generate import generate_tokens
from torchless.sampling import Sampler, SamplingParams

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_llama_gguf):
    return LLM(str(tiny_llama_gguf), seed=0)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(str(smollm2_path), n_ctx=512)


def _stream_text(chunks, key="text"):
    chunks = list(chunks)
    return "".join(c["choices"][0][key] for c in chunks), chunks


def test_completion_shape(llm):
    r = llm.create_completion(PROMPT, max_tokens=8)
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert isinstance(r["created"], int) and r["model"] == llm.model_path
    (choice,) = r["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0 and choice["logprobs"] is None
    u = r["usage"]
    assert u["prompt_tokens"] == len(llm.tokenize(PROMPT))
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "length":
        assert u["completion_tokens"] == 8
    assert llm(PROMPT, max_tokens=8)["choices"][0]["text"] == choice["text"]  # __call__


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=0, min_p=0.0, seed=5)])
def test_stream_chunks_concatenate_to_the_plain_text(llm, sampling):
    plain = llm.create_completion(PROMPT, max_tokens=12, **sampling)
    text, chunks = _stream_text(llm.create_completion(PROMPT, max_tokens=12, stream=True, **sampling))
    assert text == plain["choices"][0]["text"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_streamed_text_is_the_decoded_tokens(llm):
    """Pieces never split a character: their concatenation is the one-shot decode of the ids."""
    ids = llm.tokenize(PROMPT)
    llm.state.reset()
    generated = list(generate_tokens(llm.model, llm.state, ids, Sampler(SamplingParams(temperature=0)), 24,
                                     llm.tokenizer.eos_ids))
    text, _ = _stream_text(llm(PROMPT, max_tokens=24, stream=True))
    assert text == llm.detokenize(generated)


def test_token_id_prompt_equals_text_prompt(llm):
    ids = llm.tokenize(PROMPT)
    assert llm(ids, max_tokens=6)["choices"][0]["text"] == llm(PROMPT, max_tokens=6)["choices"][0]["text"]
    assert llm.detokenize(ids) == PROMPT


def test_seeded_sampling_is_reproducible(llm):
    a, b = (llm(PROMPT, max_tokens=10, temperature=1.2, top_k=0, min_p=0.0, seed=11)["choices"][0]["text"]
            for _ in range(2))
    assert a == b


def test_stop_strings_cut_the_text(llm):
    full = llm(PROMPT, max_tokens=16)["choices"][0]["text"]
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[:full.find(stop)]
    r = llm(PROMPT, max_tokens=16, stop=[stop, "\x00never"])
    assert r["choices"][0]["text"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 16  # generation ends at the stop string
    text, chunks = _stream_text(llm(PROMPT, max_tokens=16, stop=stop, stream=True))
    assert text == expected and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_context_limits(tiny_llama_gguf):
    small = LLM(str(tiny_llama_gguf), n_ctx=12)
    assert small.n_ctx == 12
    ids = list(range(100, 108))
    r = small(ids, max_tokens=100)  # more than fits: generation stops with the context full
    assert r["choices"][0]["finish_reason"] in ("length", "stop")
    if r["choices"][0]["finish_reason"] == "length":
        assert r["usage"]["total_tokens"] == 12
    with pytest.raises(ContextOverflowError, match="prompt has 12 tokens but the context is 12"):
        small(list(range(100, 112)), stream=True)  # raised at the call, not at the first chunk
    with pytest.raises(ContextOverflowError, match="prompt has 40 tokens"):
        small(" a" * 40)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-3), dict(min_p=2.0),
                                 dict(repeat_penalty=0.0), dict(temperature=float("nan"))])
def test_invalid_sampling_values_raise(llm, bad):
    with pytest.raises(TorchlessError, match=next(iter(bad))):
        llm(PROMPT, **bad)


def test_bad_inputs(llm, tiny_llama_gguf):
    with pytest.raises(TorchlessError, match="outside the vocabulary"):
        llm([1, 10 ** 9])
    with pytest.raises(TorchlessError, match="empty"):
        llm([])
    with pytest.raises(TorchlessError, match="cannot split"):
        LLM(str(tiny_llama_gguf), parallel="tp=64")
    with pytest.raises(TorchlessError, match="known: smollm2"):
        LLM("no-such-model")
    with pytest.raises(TorchlessError, match="no such file"):
        LLM("/no/such/model.gguf")
    with pytest.raises(TorchlessError, match="content"):
        llm.create_chat_completion([{"role": "user"}])


def test_a_newer_request_interrupts_an_unfinished_stream(llm):
    old = llm(PROMPT, max_tokens=30, stream=True)
    next(old)
    llm(PROMPT, max_tokens=2)
    with pytest.raises(TorchlessError, match="interrupted"):
        list(old)


def test_chat_completion_shapes(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    r = llm.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    chunks = list(llm.create_chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["usage"] == r["usage"]


@pytest.mark.slow
def test_smollm2_answers_and_stops_on_its_own(smol):
    r = smol("The capital of France is", max_tokens=8)
    assert "Paris" in r["choices"][0]["text"]
    chat = smol.create_chat_completion([{"role": "user", "content": "What is 2+2?"}], max_tokens=60,
                                       temperature=0)
    assert chat["choices"][0]["finish_reason"] == "stop"  # the end-of-turn token, not the limit
    assert chat["usage"]["completion_tokens"] < 60
    assert "4" in chat["choices"][0]["message"]["content"]
    assert "<|im_end|>" not in chat["choices"][0]["message"]["content"]


def test_tensor_parallel_llm_writes_the_same_text(llm, tiny_llama_gguf):
    from torchless import ParallelConfig

    sharded = LLM(str(tiny_llama_gguf), parallel=ParallelConfig.tensor_parallel(2))
    try:
        ours = sharded(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"]
    finally:
        sharded.close()
    assert ours == llm(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"]
