"""`torchless serve`, driven by the official `openai` client against a server on a free port.
The oracle for text is `LLM` in one process (itself held to transformers elsewhere)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

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
def server(llm):
    base, logs, app, srv, thread = _serve(llm, max_batch=4, api_key=KEY)
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
    ('{"prompt": "hi", "temperature": -1}', 400, None),
    ('{"prompt": "hi", "top_p": 7}', 400, None),
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


def test_models_health_and_metrics(client, server):
    assert len(client.models.list().data) == 1
    code, text = _get(server[0] + "/metrics")
    assert code == 200
    for name in ("torchless_requests_total", "torchless_tokens_generated_total",
                 "torchless_batch_size", "torchless_queue_depth"):
        assert name in text


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
