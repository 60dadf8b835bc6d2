"""LLM end to end: OpenAI result shapes, streaming == non-streaming, stop strings, limits, errors."""

from __future__ import annotations

import numpy as np
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


# -- logprobs and echo (issue 13) ------------------------------------------------------------------

def _ids_of(llm, texts) -> list[int]:
    """Token ids from the texts logprobs report (each unique in this vocabulary)."""
    from torchless.logprobs import token_text

    table = {}
    for i in range(llm.config.vocab_size):
        table.setdefault(token_text(llm.tokenizer, i), []).append(i)
    assert all(len(table[t]) == 1 for t in texts)
    return [table[t][0] for t in texts]


def _reference_logprobs(llm, ids) -> np.ndarray:
    """log-softmax of the reference forward's logits after each of ids, one token at a time."""
    state = llm.model.new_state(len(ids) + 1)
    rows = []
    for t in ids:
        x = np.array(llm.model.forward(state, t), dtype=np.float64)
        rows.append(x - x.max() - np.log(np.exp(x - x.max()).sum()))
    return np.array(rows)


def test_logprobs_and_echo_equal_a_log_softmax_of_the_logits(llm):
    kw = dict(max_tokens=6, temperature=0.8, top_k=0, min_p=0.0, seed=4, logprobs=2)
    r = llm(PROMPT, echo=True, **kw)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    prompt = llm.tokenize(PROMPT)
    ended = choice["finish_reason"] == "stop"  # the end-of-sequence token is reported too
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(prompt) + r["usage"]["completion_tokens"] + ended
    ids = _ids_of(llm, lp["tokens"])
    assert ids[:len(prompt)] == prompt
    ref = _reference_logprobs(llm, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[i - 1][ids[i]] for i in range(1, len(ids))], atol=1e-4)
    for i in range(1, len(ids)):
        top = sorted(lp["top_logprobs"][i].values(), reverse=True)
        np.testing.assert_allclose(top[:2], np.sort(ref[i - 1])[::-1][:2], atol=1e-4)
        assert lp["tokens"][i] in lp["top_logprobs"][i]  # the chosen token, always
    for token, at in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][at:at + len(token)] == token
    plain = llm(PROMPT, **kw)["choices"][0]
    assert plain["text"] == choice["text"][len(PROMPT):]
    assert plain["logprobs"]["token_logprobs"] == lp["token_logprobs"][len(prompt):]
    assert plain["logprobs"]["text_offset"] == lp["text_offset"][len(prompt):]  # from the prompt's start
    chunks = list(llm(PROMPT, echo=True, stream=True, **kw))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["tokens"]] \
        == lp["tokens"]
    echoed = llm(PROMPT, max_tokens=3, echo=True)["choices"][0]
    assert echoed["text"].startswith(PROMPT) and echoed["logprobs"] is None


def test_chat_logprobs(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    r = llm.create_chat_completion(messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] + (r["choices"][0]["finish_reason"] == "stop")
    prompt = llm._prompt_ids(llm._render_chat(messages), template=True)
    ids = prompt + _ids_of(llm, [c["token"] for c in content])
    ref = _reference_logprobs(llm, ids)
    for j, c in enumerate(content):
        row = ref[len(prompt) + j - 1]
        assert c["logprob"] == pytest.approx(row.max(), abs=1e-4)  # greedy: the likeliest
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)
        assert bytes(c["bytes"]) == llm.tokenizer.token_bytes(ids[len(prompt) + j])
    chunks = list(llm.create_chat_completion(messages, max_tokens=6, temperature=0, logprobs=True,
                                             top_logprobs=3, stream=True))
    assert [c for k in chunks if k["choices"][0]["logprobs"] for c in k["choices"][0]["logprobs"]["content"]] == content
    assert llm.create_chat_completion(messages, max_tokens=2)["choices"][0]["logprobs"] is None
    with pytest.raises(TorchlessError, match="top_logprobs"):
        llm.create_chat_completion(messages, top_logprobs=2)


def test_content_parts_are_joined(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert llm.create_chat_completion(parts, max_tokens=5, temperature=0)["choices"][0]["message"] == \
        llm.create_chat_completion([{"role": "user", "content": "Hi there"}], max_tokens=5,
                                   temperature=0)["choices"][0]["message"]
    with pytest.raises(TorchlessError, match="image_url"):
        llm.create_chat_completion([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_echo_logprobs_need_a_runner_that_can_score_the_prompt(tiny_llama_gguf):
    piped = LLM(str(tiny_llama_gguf), parallel="pp=2,mb=2")
    try:
        with pytest.raises(TorchlessError, match="without a pipeline"):
            piped(PROMPT, max_tokens=2, logprobs=1, echo=True)
        assert piped(PROMPT, max_tokens=2, logprobs=1)["choices"][0]["logprobs"]["tokens"]
    finally:
        piped.close()


def test_chat_response_format_json_schema_in_the_library(tiny_llama_gguf):
    import json

    llm = LLM(str(tiny_llama_gguf))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(3):
        out = llm.create_chat_completion([{"role": "user", "content": "a digit"}], max_tokens=20, seed=seed,
                                         temperature=1.0, response_format={"type": "json_schema",
                                                                           "json_schema": {"schema": schema}})
        value = json.loads(out["choices"][0]["message"]["content"])
        assert set(value) == {"n"} and 0 <= value["n"] <= 9
    with pytest.raises(TorchlessError, match="response_format type 'yaml' is not supported"):
        llm.create_chat_completion([{"role": "user", "content": "x"}], response_format={"type": "yaml"})
    llm.close()
