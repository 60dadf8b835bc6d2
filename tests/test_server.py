"""`torchless serve`, driven by the official `openai` client against a server on a free port.
The oracle for text is `LLM` in one process (itself held to transformers elsewhere)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import uvicorn

from torchless import LLM
from torchless.server.app import create_app

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm(tiny_llama_gguf):
    return LLM(str(tiny_llama_gguf))


def _serve(llm, **kw):
    port = _free_port()
    logs = []
    app = create_app(llm, log=logs.append, **kw)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", logs, app, srv, thread


@pytest.fixture(scope="module")
def server(tiny_llama_gguf):
    # its own LLM: the server's engine thread steps it alone (`llm` is the library to compare with)
    base, logs, app, srv, thread = _serve(LLM(str(tiny_llama_gguf)), max_batch=4, api_key=KEY)
    yield base, logs, app
    srv.should_exit = True
    thread.join(10)


def concurrent_greedy_texts(client, prompts, max_tokens) -> list[str]:
    """Each prompt's greedy completion, all requested at once (so they share decode steps)."""
    results = [None] * len(prompts)

    def one(i):
        results[i] = client.completions.create(model="x", prompt=prompts[i], max_tokens=max_tokens,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("spec", ["pp=2,mb=2", "tp=2"])
def test_a_parallel_server_gives_each_request_its_own_text(tiny_llama_gguf, llm, spec):
    """Concurrent requests through two stage threads as micro-batches, or two tensor shards."""
    piped = LLM(str(tiny_llama_gguf), parallel=spec)
    base, logs, app, srv, thread = _serve(piped, max_batch=4)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        prompts = ["Hello", "Once upon a time", "1, 2, 3,", "The quick brown fox"]
        assert concurrent_greedy_texts(client, prompts, 8) == [
            llm(p, max_tokens=8, temperature=0)["choices"][0]["text"] for p in prompts]
        if spec.startswith("pp"):
            assert all(b > 0 for b in piped.runner.busy_seconds)
    finally:
        srv.should_exit = True
        thread.join(10)
        piped.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_equals_the_library(client, llm):
    r = client.completions.create(model="x", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].text == llm("The quick brown fox", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens == len(llm.tokenize("The quick brown fox"))


def test_a_list_of_prompts_gives_a_choice_each(client, llm):
    prompts = ["Hello", "Once upon a time", "1, 2, 3,"]
    r = client.completions.create(model="x", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [llm(p, max_tokens=6, temperature=0)["choices"][0]["text"]
                                           for p in prompts]


def test_chat_completion(client, llm):
    messages = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
    want = llm.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert r.choices[0].message.role == "assistant"


def test_streamed_deltas_add_up_to_the_whole(client):
    whole = client.completions.create(model="x", prompt="Water boils at", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="x", prompt="Water boils at", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    chat = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0, stream=True))
    whole_chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole_chat.choices[0].message.content


def test_stop_sequences(client, llm):
    full = llm("The quick brown fox", max_tokens=12, temperature=0)["choices"][0]["text"]
    stop = full[3:5]
    r = client.completions.create(model="x", prompt="The quick brown fox", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    kw = dict(model="x", prompt="Hello", max_tokens=10, temperature=1.0, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_greedy_output_does_not_depend_on_the_batch(client, llm):
    want = llm("In 1492,", max_tokens=10, temperature=0)["choices"][0]["text"]
    results = [None] * 4

    def one(i):
        results[i] = client.completions.create(model="x", prompt="In 1492," if i == 0 else f"Noise {i}",
                                               max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == want


@pytest.mark.parametrize("body, status, param", [
    ('{"prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ('{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    ('{"prompt": "hi", "top_p": 7}', 400, "top_p"),
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"prompt": "hi", "stop": 3}', 400, "stop"),
    ('{"prompt": "hi"', 400, None),
    ('[1, 2]', 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    code, payload = _post(server[0] + "/v1/completions", body.encode())
    assert code == status and payload["error"]["message"] and payload["error"]["param"] == param
    assert _get(server[0] + "/health")[0] == 200


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,                         # nested past the parser's recursion limit
    json.dumps({"prompt": "\ud800 lone surrogate"}).encode(),
    json.dumps({"model": "x", "messages": [{"role": "user", "content": "\udfff"}]}).encode(),
    json.dumps({"prompt": ""}).encode(),                    # no tokens at all
], ids=["deep", "surrogate-prompt", "surrogate-message", "empty-prompt"])
def test_hostile_bodies_get_a_400_and_the_server_stays_up(server, body):
    url = server[0] + ("/v1/chat/completions" if b"messages" in body else "/v1/completions")
    status, answer = _post(url, body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert _post(server[0] + "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode())[0] == 200


def test_prompt_longer_than_the_context(server, llm):
    code, payload = _post(server[0] + "/v1/completions", json.dumps(
        {"prompt": "word " * (llm.n_ctx + 10)}).encode())
    assert code == 400 and payload["error"]["code"] == "context_length_exceeded"


def test_oversized_body(server):
    code, payload = _post(server[0] + "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert code == 413 and "body" in payload["error"]["message"]


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        code, payload = _post(server[0] + "/v1/completions", b'{"prompt": "hi"}', key=key)
        assert code == 401 and payload["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def _metrics(base) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = _get(base + "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_models_health_and_metrics(client, server):
    """/metrics in vLLM's names, with its model_name label, plus the process's own."""
    assert len(client.models.list().data) == 1
    model = {"model_name": client.models.list().data[0].id}
    label = tuple(model.items())
    before = _metrics(server[0])
    out = client.completions.create(model="x", prompt="Once upon a time", max_tokens=5, temperature=0)
    after = _metrics(server[0])

    def moved(name, extra=()):
        key = (name, tuple(sorted(label + extra)))
        return after[key] - before.get(key, 0)

    assert moved("vllm:generation_tokens_total") == out.usage.completion_tokens
    assert moved("vllm:prompt_tokens_total") == out.usage.prompt_tokens
    assert moved("vllm:request_success_total", (("finished_reason", out.choices[0].finish_reason),)) == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:inter_token_latency_seconds_count") == out.usage.completion_tokens - 1
    assert after[("vllm:num_requests_running", label)] == 0
    assert after[("vllm:num_requests_waiting", label)] == 0
    assert after[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert moved("vllm:prefix_cache_queries_total") == out.usage.prompt_tokens
    # a prompt twice: the second time it runs only its last token, its others are found (in
    # blocks of 4)
    prompt = "Once upon a time, in a land far away, there lived a"
    out = client.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=0)
    before = _metrics(server[0])
    again = client.completions.create(model="x", prompt=prompt, max_tokens=5, temperature=0)
    after = _metrics(server[0])
    assert moved("vllm:prefix_cache_hits_total") == (again.usage.prompt_tokens - 1) // 4 * 4 > 0
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 4 * 4
    assert again.choices[0].text == out.choices[0].text


def test_disconnect_mid_stream_cancels_and_the_server_keeps_serving(client, server):
    engine = server[2].state.engine
    stream = client.completions.create(model="x", prompt="Tell me a long story", max_tokens=200,
                                       temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away
    deadline = time.monotonic() + 20
    while engine.batch_size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.batch_size == 0  # its sequence left the batch
    assert client.completions.create(model="x", prompt="Hi", max_tokens=4, temperature=0).choices[0].text is not None
    assert any("request done" in line for line in server[1])


def _post(url, data: bytes, key: str | None = KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


@pytest.mark.parametrize("kwargs, status", [
    (dict(prompt="hi", max_tokens=-3), 400),
    (dict(prompt="hi", temperature=-1), 400),
    (dict(prompt="hi", top_p=7), 400),
    (dict(prompt="hi", extra_body={"max_tokens": "many"}), 400),
    (dict(prompt="word " * 5000), 400),
    (dict(prompt="a" * (2 << 20)), 413),
])
def test_errors_reach_the_openai_client_as_its_own_exceptions(client, kwargs, status):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="x", **kwargs)
    assert e.value.status_code == status
    assert e.value.body["message"]  # OpenAI's error shape, as the client parses it
    assert client.completions.create(model="x", prompt="ok", max_tokens=2).choices  # still up


def test_n_choices_of_a_seeded_request_differ_and_repeat(client):
    kw = dict(model="x", prompt="Hello", max_tokens=8, temperature=1.0, seed=7, n=3)
    first = [c.text for c in client.completions.create(**kw).choices]
    assert len(first) == 3 and len(set(first)) > 1
    assert [c.text for c in client.completions.create(**kw).choices] == first


# -- failures: a step that raises, an engine that cannot step, a client that goes away ----------

def _patched_server(tiny_llama_gguf, forward):
    """A server on its own LLM whose micro-batches go through forward(real, spans)."""
    own = LLM(str(tiny_llama_gguf))
    real = own.runner.model.forward_spans
    own.runner.model.forward_spans = lambda spans, *a, **k: forward(real, spans, *a, **k)
    return own, _serve(own, max_batch=1)


def test_a_failing_step_fails_its_request_and_the_server_goes_on(tiny_llama_gguf, llm):
    poison = llm.tokenize("Zebra")[-1]

    def forward(real, spans, *a, **k):
        if any(poison in sp.tokens for sp in spans):
            raise RuntimeError("injected failure")
        return real(spans, *a, **k)

    own, (base, logs, app, srv, thread) = _patched_server(tiny_llama_gguf, forward)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="injected failure"):
            client.completions.create(model="x", prompt="Zebra", max_tokens=4)
        with pytest.raises(openai.APIError, match="injected failure"):  # an error event in the stream
            list(client.completions.create(model="x", prompt="Zebra", max_tokens=4, stream=True))
        ok = client.completions.create(model="x", prompt="Hello", max_tokens=6, temperature=0)
        assert ok.choices[0].text == llm("Hello", max_tokens=6, temperature=0)["choices"][0]["text"]
        assert _get(base + "/health")[0] == 200
    finally:
        srv.should_exit = True
        thread.join(10)


def test_health_is_503_when_the_engine_cannot_step(tiny_llama_gguf):
    own, (base, logs, app, srv, thread) = _patched_server(tiny_llama_gguf, lambda real, spans, *a, **k: real(spans, *a, **k))
    engine = app.state.engine

    def broken():
        raise MemoryError("no memory left")

    engine.engine.step = broken
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError, match="no memory left"):
            client.completions.create(model="x", prompt="Hello", max_tokens=4)
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/health")
        assert e.value.code == 503
        with pytest.raises(openai.InternalServerError, match="engine has stopped"):
            client.completions.create(model="x", prompt="Hello", max_tokens=4)
    finally:
        srv.should_exit = True
        thread.join(10)


def test_a_non_streamed_request_whose_client_goes_away_is_cancelled(tiny_llama_gguf):
    def slow(real, spans, *a, **k):  # 500 tokens would take over 10 s
        time.sleep(0.02)
        return real(spans, *a, **k)

    own, (base, logs, app, srv, thread) = _patched_server(tiny_llama_gguf, slow)
    engine = app.state.engine
    try:
        body = json.dumps({"prompt": "Tell me a story", "max_tokens": 500, "temperature": 0}).encode()
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 10
            while engine.batch_size == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.batch_size == 1
        gone = time.monotonic()  # the client closed its connection without reading
        while engine.batch_size and time.monotonic() < gone + 10:
            time.sleep(0.02)
        assert engine.batch_size == 0 and time.monotonic() - gone < 3
        assert engine.tokens_generated < 250
    finally:
        srv.should_exit = True
        thread.join(10)


def test_a_body_framed_two_ways_is_refused_at_once(server):
    """Content-Length and chunked Transfer-Encoding together: a 400 at once, not a wait for a
    body that one of the two framings says never ends (the start of request smuggling)."""
    port = int(server[0].rsplit(":", 1)[1])
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                  b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (KEY.encode(), len(body)) + body)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 400"), head


# -- issue 13: logprobs, every field honoured or refused, content parts, streaming, endpoints ----

def _reference_logprobs(llm, ids) -> np.ndarray:
    """log-softmax (float64) of the reference forward's logits after each token of ids: row i
    is the distribution of token i + 1. One token at a time: not the engine's batched path."""
    state = llm.model.new_state(len(ids) + 1)
    rows = []
    for t in ids:
        x = np.array(llm.model.forward(state, t), dtype=np.float64)
        rows.append(x - x.max() - np.log(np.exp(x - x.max()).sum()))
    return np.array(rows)


@pytest.fixture(scope="module")
def ids_of_text(llm):
    """token text (as logprobs write it) -> token id; the texts of the tokens used are unique."""
    from torchless.logprobs import token_text

    table = {}
    for i in range(llm.config.vocab_size):
        table.setdefault(token_text(llm.tokenizer, i), []).append(i)
    return lambda texts: [table[t][0] if len(table[t]) == 1 else pytest.fail(f"{t!r} is ambiguous")
                          for t in texts]


def _check_top(top: dict, row: np.ndarray, chosen_text: str, k: int, text_of):
    """top: the k likeliest of row (by text), plus the chosen token."""
    best = np.argsort(-row, kind="stable")[:k]
    want = {text_of(int(i)): row[i] for i in best}
    assert set(want) <= set(top) and len(top) <= k + 1 and chosen_text in top
    for text, value in want.items():
        assert top[text] == pytest.approx(value, abs=1e-4)


def test_completion_logprobs_and_echo_equal_a_log_softmax_of_the_logits(client, llm, ids_of_text):
    from torchless.logprobs import token_text

    prompt = "The quick brown fox"
    kw = dict(model="x", prompt=prompt, max_tokens=6, temperature=0.8, seed=5, logprobs=3)
    echoed = client.completions.create(echo=True, **kw).choices[0]
    lp = echoed.logprobs
    n_prompt = len(llm.tokenize(prompt))
    assert echoed.text.startswith(prompt) and len(lp.tokens) > n_prompt
    ids = ids_of_text(lp.tokens)
    assert ids[:n_prompt] == llm.tokenize(prompt)
    ref = _reference_logprobs(llm, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token: none
    np.testing.assert_allclose(lp.token_logprobs[1:], [ref[i - 1][ids[i]] for i in range(1, len(ids))],
                               atol=1e-4)  # temperature 0.8 sampled them; the logprobs are raw
    for i in range(1, len(ids)):
        _check_top(lp.top_logprobs[i], ref[i - 1], lp.tokens[i], 3, lambda t: token_text(llm.tokenizer, t))
    for token, at in zip(lp.tokens, lp.text_offset):  # offsets from the start of the prompt
        assert echoed.text[at:at + len(token)] == token
    # without echo: the completion's part, offsets still counted from the prompt's start
    plain = client.completions.create(**kw).choices[0]
    assert plain.text == echoed.text[len(prompt):]
    assert plain.logprobs.tokens == lp.tokens[n_prompt:]
    assert plain.logprobs.token_logprobs == lp.token_logprobs[n_prompt:]
    assert plain.logprobs.text_offset == lp.text_offset[n_prompt:]
    # an end-of-sequence token is reported too (lm-eval's scoring reads all but the last entry)
    eos = llm.tokenizer.eos_id
    ended = client.completions.create(**dict(kw, max_tokens=1, logit_bias={str(eos): 100}), echo=True).choices[0]
    assert ended.text == prompt and ended.finish_reason == "stop"
    assert ended.logprobs.tokens == lp.tokens[:n_prompt] + [token_text(llm.tokenizer, eos)]
    assert ended.logprobs.token_logprobs[-1] == pytest.approx(ref[n_prompt - 1][eos], abs=1e-4)
    # streamed: the chunks' lists add up to the same
    chunks = list(client.completions.create(echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == echoed.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, key)] == \
            getattr(lp, key)


def test_chat_logprobs_equal_a_log_softmax_of_the_logits(client, llm, ids_of_text):
    messages = [{"role": "user", "content": "Say hi"}]
    kw = dict(model="x", messages=messages, max_tokens=6, temperature=0.9, seed=2, logprobs=True)
    r = client.chat.completions.create(top_logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    ended = r.choices[0].finish_reason == "stop"  # the end-of-sequence token has its logprob too
    assert len(content) == r.usage.completion_tokens + ended
    prompt = llm._prompt_ids(llm._render_chat(messages), template=True)
    ids = prompt + ids_of_text([c.token for c in content])
    ref = _reference_logprobs(llm, ids)
    for j, c in enumerate(content):
        row = ref[len(prompt) + j - 1]
        assert c.logprob == pytest.approx(row[ids[len(prompt) + j]], abs=1e-4)
        assert bytes(c.bytes) == llm.tokenizer.token_bytes(ids[len(prompt) + j])
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(sorted(row)[::-1][:2], abs=1e-4)
    assert "".join(c.token for c in content[:r.usage.completion_tokens]) == r.choices[0].message.content
    bare = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [c.token for c in bare] == [c.token for c in content] and all(c.top_logprobs == [] for c in bare)
    assert client.chat.completions.create(**dict(kw, logprobs=False)).choices[0].logprobs is None
    streamed = [c for chunk in client.chat.completions.create(top_logprobs=2, stream=True, **kw)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_sampling_fields_are_honoured_with_openai_defaults(client, llm):
    """The server samples as the library does with the same settings; top_k, min_p and the
    penalties are off unless asked for (the library's own defaults are llama.cpp's)."""
    prompt = "Once upon a time"
    off = dict(top_k=0, min_p=0.0, top_p=1.0)
    got = client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=1.0, seed=9)
    assert got.choices[0].text == llm(prompt, max_tokens=10, temperature=1.0, seed=9, **off)["choices"][0]["text"]
    settings = dict(top_k=5, min_p=0.1, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=1.5,
                    logit_bias={llm.tokenize(" the")[-1]: 3.0})
    got = client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0.7, seed=3,
                                    frequency_penalty=1.5, presence_penalty=0.5,
                                    logit_bias={str(k): v for k, v in settings["logit_bias"].items()},
                                    extra_body=dict(top_k=5, min_p=0.1, repeat_penalty=1.3))
    want = llm(prompt, max_tokens=10, temperature=0.7, seed=3, top_p=1.0, **settings)["choices"][0]["text"]
    assert got.choices[0].text == want
    forced = llm.tokenize(" sea")[-1]
    r = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == llm.detokenize([forced] * 4)


@pytest.mark.parametrize("endpoint, extra, param", [
    ("chat", dict(response_format={"type": "regex"}), "response_format"),
    ("chat", dict(tools=[{"type": "function", "function": {"name": "not a name"}}]), "tools"),
    ("chat", dict(tool_choice="auto"), "tool_choice"),
    ("chat", dict(extra_body={"frobnicate": 1}), "frobnicate"),
    ("chat", dict(top_logprobs=3), "top_logprobs"),
    ("chat", dict(stream_options={"include_usage": True}), "stream_options"),
    ("chat", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), "messages"),
    ("completions", dict(suffix="end"), "suffix"),
    ("completions", dict(best_of=3), "best_of"),
    ("completions", dict(logprobs=50), "logprobs"),
    ("completions", dict(extra_body={"logit_bias": {"999999999": 1}}), "logit_bias"),
    ("completions", dict(extra_body={"presence_penalty": 3}), "presence_penalty"),
    ("completions", dict(extra_body={"mirostat": 2}), "mirostat"),
])
def test_fields_not_supported_are_refused_with_a_400_naming_them(client, endpoint, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(**dict(dict(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=2), **extra))
        else:
            client.completions.create(model="x", prompt="Hi", max_tokens=2, **extra)
    assert e.value.body["param"] == param and param in e.value.body["message"]


def test_fields_that_ask_for_nothing_more_are_accepted(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       response_format={"type": "text"}, tool_choice="none", user="me",
                                       metadata={"k": "v"}, store=False)
    assert r.choices[0].message.role == "assistant"


def test_content_parts_and_tool_call_turns(client, llm):
    joined = [{"role": "user", "content": "Hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    kw = dict(model="x", max_tokens=6, temperature=0)
    assert client.chat.completions.create(messages=parts, **kw).choices[0].message.content == \
        client.chat.completions.create(messages=joined, **kw).choices[0].message.content
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function",
                  "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = client.chat.completions.create(messages=turns, **kw)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_role_first_and_usage_only_when_asked(client, llm):
    messages = [{"role": "user", "content": "Hi"}]
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, n=2))
    for i in (0, 1):
        own = [c for c in chunks if c.choices and c.choices[0].index == i]
        assert own[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in own[1:])
    assert all(c.usage is None for c in chunks)
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, n=2, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    n_prompt = len(llm._prompt_ids(llm._render_chat(messages), template=True))
    assert last.usage.prompt_tokens == n_prompt  # the prompt once, however many choices
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=5, temperature=0, n=2)
    assert whole.usage.prompt_tokens == n_prompt
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    done = list(client.completions.create(model="x", prompt="Hi", max_tokens=3, stream=True,
                                          stream_options={"include_usage": True}))
    assert done[-1].choices == [] and done[-1].usage.prompt_tokens == len(llm.tokenize("Hi"))


def test_tokenize_detokenize_and_the_model_endpoints(client, server, llm, tiny_llama_gguf):
    text = "Hello world, again"
    code, out = _post(server[0] + "/tokenize", json.dumps({"content": text}).encode())
    assert code == 200 and out["tokens"] == llm.tokenize(text, add_bos=False)  # llama.cpp's default
    code, out = _post(server[0] + "/tokenize", json.dumps({"content": text, "add_special": True,
                                                           "with_pieces": True}).encode())
    assert [t["id"] for t in out["tokens"]] == llm.tokenize(text, add_bos=True)
    assert "".join(t["piece"] for t in out["tokens"]).endswith(text)
    code, out = _post(server[0] + "/tokenize", json.dumps({"prompt": text}).encode())  # vLLM's
    assert out["tokens"] == llm.tokenize(text, add_bos=True) and out["count"] == len(out["tokens"])
    code, out = _post(server[0] + "/detokenize", json.dumps({"tokens": llm.tokenize(text, add_bos=False)}).encode())
    assert code == 200 and out == {"content": text}
    assert _post(server[0] + "/detokenize", b'{"tokens": [-1]}')[0] == 400
    assert _post(server[0] + "/tokenize", b'{"content": "x"}', key="wrong")[0] == 401
    name = tiny_llama_gguf.stem  # the file's stem, not its path
    assert [m.id for m in client.models.list().data] == [name] and client.models.retrieve(name).id == name
    assert client.completions.create(model=name, prompt="Hi", max_tokens=1).model == name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_served_model_name(tiny_llama_gguf):
    from starlette.testclient import TestClient

    from torchless.cli import build_parser

    assert build_parser().parse_args(["serve", "--served-model-name", "mine"]).served_model_name == "mine"
    own = LLM(str(tiny_llama_gguf))
    with TestClient(create_app(own, model_name="mine", log=lambda m: None)) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "mine"
        assert http.get("/v1/models/mine").status_code == 200


def test_a_served_llm_refuses_direct_calls_that_would_race_its_engine(tiny_llama_gguf):
    """Two threads stepping one engine take each other's tokens (an IndexError in the
    scheduler, once): a served LLM says so instead."""
    from torchless.errors import TorchlessError

    own = LLM(str(tiny_llama_gguf))
    app = create_app(own, log=lambda m: None)
    with pytest.raises(TorchlessError, match="this LLM is serving HTTP requests"):
        own.create_completion("hi", max_tokens=2)
    with pytest.raises(TorchlessError, match="already serving"):
        create_app(own, log=lambda m: None)
    app.state.engine.close()
    assert own.create_completion("hi", max_tokens=2, temperature=0)["choices"][0]["text"] is not None


def test_embeddings_equal_the_mean_final_hidden_state_at_unit_length(client, llm):
    """/v1/embeddings through the official client: per input the mean over its tokens of the
    last hidden states after the final norm, scaled to unit length; texts and token ids alike."""
    texts = ["The cat sat on the mat.", "Quantum chromodynamics"]
    out = client.embeddings.create(model="x", input=texts)
    assert [d.index for d in out.data] == [0, 1]
    assert out.usage.prompt_tokens == sum(len(llm.tokenize(t)) for t in texts)
    for text, item in zip(texts, out.data):
        ids = llm.tokenize(text)
        hidden = llm.model.hidden_states(llm.model.new_state(len(ids)), ids).astype(np.float64)
        expected = hidden.mean(0) / np.linalg.norm(hidden.mean(0))
        np.testing.assert_allclose(item.embedding, expected, rtol=1e-6, atol=1e-7)
    by_ids = client.embeddings.create(model="x", input=llm.tokenize(texts[0]))
    np.testing.assert_allclose(by_ids.data[0].embedding, out.data[0].embedding, rtol=1e-6)
    # the client asks for base64 unless told (and decodes it): floats as asked, base64 as given
    floats = client.embeddings.create(model="x", input=texts[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, out.data[1].embedding, rtol=1e-6)
    encoded = client.embeddings.create(model="x", input=texts[1], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(encoded.data[0].embedding), "<f4")
    np.testing.assert_allclose(decoded, out.data[1].embedding, rtol=1e-6)
    for bad in ({"input": ""}, {"input": [1.5]}, {"input": "hi", "dimensions": 8}, {"input": "hi", "x": 1}):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="x", **{k: v for k, v in bad.items() if k in ("input", "dimensions")},
                                     extra_body={k: v for k, v in bad.items() if k not in ("input", "dimensions")})


def test_response_format_json_schema_output_parses_and_validates_under_sampling(client):
    """Every token inside the schema's grammar: whatever the seed, the text parses and has
    exactly the schema's fields and types (the tiny random model, left alone, writes noise)."""
    import json as _json

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "tag": {"type": "string", "enum": ["a", "bb", "ccc"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    for seed in range(4):
        out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=40, temperature=1.0, seed=seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        value = _json.loads(out.choices[0].message.content)
        assert set(value) == {"ok", "tag"} and isinstance(value["ok"], bool) and value["tag"] in ("a", "bb", "ccc")
    any_object = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=60, temperature=0, response_format={"type": "json_object"})
    if any_object.choices[0].finish_reason == "stop":
        assert isinstance(_json.loads(any_object.choices[0].message.content), dict)
    else:
        assert any_object.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "xml"})
