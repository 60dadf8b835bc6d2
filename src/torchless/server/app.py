"""`torchless serve`: OpenAI's completions and chat completions over HTTP, on Starlette.

Starlette (with uvicorn) because it is the small, well-kept ASGI toolkit under FastAPI: we need
routing, streaming responses and disconnect detection, not a schema framework; request bodies
are checked by hand so every error has OpenAI's shape. The server is a thin adapter: it
validates, renders the chat template, and hands token ids to the continuous batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import replace

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..engine import Sequence
from ..errors import TorchlessError
from ..sampling import Sampler, SamplingParams
from .engine import EngineThread, Request

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
DRAIN_BYTES = 16 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}}, status_code=self.status)


def _field(body: dict, name: str, types, default, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {what or types}, got {value!r}", name)
    return value


def _closing(engine):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()
    return lifespan


def create_app(llm, max_batch: int = 8, api_key: str | None = None, log=None) -> Starlette:
    log = log or (lambda m: print(f"torchless serve: {m}", file=sys.stderr, flush=True))
    llm.engine.scheduler.max_batch = max_batch
    engine = EngineThread(llm.engine, log)
    model_id = str(llm.model_path)

    async def parse(request: HTTPRequest) -> dict:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key", kind="authentication_error")
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            # two framings of one body: the way request smuggling starts (RFC 9112, 6.1)
            raise APIError(400, "a request may not have both Content-Length and Transfer-Encoding")
        # Keep at most MAX_BODY_BYTES, but read on (discarding) up to DRAIN_BYTES before
        # answering 413: closing on a client still sending makes it see a reset, not our error.
        parts, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total <= MAX_BODY_BYTES:
                parts.append(chunk)
            elif total > DRAIN_BYTES:
                break
        if total > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = b"".join(parts)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def sampling(body: dict, default_max_tokens: int) -> tuple[SamplingParams, int, list | None, int]:
        # OpenAI's defaults: 16 tokens for completions, up to the context for chat
        max_tokens = _field(body, "max_tokens", int, default_max_tokens, lambda v: v >= 1, "an integer >= 1")
        if "max_completion_tokens" in body:
            max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 1,
                                "an integer >= 1")
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= 8, "an integer from 1 to 8")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
            raise APIError(400, "'stop' must be a string or a list of strings", "stop")
        try:
            params = SamplingParams(
                temperature=float(_field(body, "temperature", (int, float), 1.0)),
                top_p=float(_field(body, "top_p", (int, float), 1.0)),
                seed=_field(body, "seed", int, None))
        except (TorchlessError, ValueError) as e:
            raise APIError(400, str(e)) from None
        return params, max_tokens, stop, n

    def check_fits(ids: list[int], max_tokens: int) -> int:
        n_ctx = llm.n_ctx
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", "prompt")
        if len(ids) >= n_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context is {n_ctx}",
                           "prompt", code="context_length_exceeded")
        return min(max_tokens, n_ctx - len(ids))

    async def run(prompts: list[list[int]], params, max_tokens, stop, n):
        """Start every choice at once (they batch together) and stream or collect them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, (ids, j) in enumerate((p, j) for p in prompts for j in range(n)):
            budget = check_fits(ids, max_tokens)
            emit = (lambda i: lambda text, reason: loop.call_soon_threadsafe(
                events.put_nowait, (i, text, reason)))(i)
            # n choices of one seeded request differ from each other, and repeat across calls
            own = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
            seq = Sequence(ids, Sampler(own), budget, llm.tokenizer.eos_ids,
                           llm.tokenizer.stream_decoder(), stop, index=i)
            jobs.append(Request(seq, emit, prompt=ids))
        for job in jobs:
            engine.submit(job)
        return jobs, events

    def usage(jobs) -> dict:
        # a prompt is counted once, however many choices it has (n > 1)
        n = len(jobs) // len({id(j.prompt) for j in jobs})
        p = sum(j.prompt_tokens for j in jobs[::n])
        c = sum(j.completion_tokens for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(http, jobs, events, meta, make_choice, make_delta, stream):
        if not stream:
            texts, reasons, left = [""] * len(jobs), [None] * len(jobs), len(jobs)
            try:
                loop = asyncio.get_running_loop()
                check_at = loop.time() + DISCONNECT_POLL_S
                while left:
                    try:
                        item = await asyncio.wait_for(events.get(), max(0.0, check_at - loop.time()))
                    except asyncio.TimeoutError:
                        item = None
                    if loop.time() >= check_at:  # tokens arriving must not hide a departure
                        check_at = loop.time() + DISCONNECT_POLL_S
                        if await http.is_disconnected():
                            log("client gone: request cancelled")
                            return PlainTextResponse("", status_code=499)  # nobody reads it
                    if item is None:
                        continue
                    i, text, reason = item
                    texts[i] += text or ""
                    if reason is not None:
                        if reason.startswith("error"):
                            raise APIError(500, reason[len("error: "):], kind="server_error")
                        reasons[i], left = reason, left - 1
            finally:  # an error, or the client gone: the other choices stop too
                for job in jobs:
                    engine.cancel(job)
            return JSONResponse(dict(meta, choices=[make_choice(i, t, r) for i, (t, r) in
                                                    enumerate(zip(texts, reasons))], usage=usage(jobs)))

        async def sse():
            left = len(jobs)
            try:
                while left:
                    i, text, reason = await events.get()
                    if reason is not None and reason.startswith("error"):
                        # OpenAI's way: an error object in the stream, then the end of it
                        error = {"message": reason[len("error: "):], "type": "server_error",
                                 "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    if reason is not None:
                        left -= 1
                    chunk = dict(meta, choices=[make_delta(i, text or "", reason)])
                    if not left:
                        chunk["usage"] = usage(jobs)
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free its sequences
                for job in jobs:
                    engine.cancel(job)

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def completions(http: HTTPRequest):
        body = await parse(http)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        params, max_tokens, stop, n = sampling(body, 16)
        stream = _field(body, "stream", bool, False, what="a boolean")
        ids = [llm.tokenize(p) for p in prompts]
        jobs, events = await run(ids, params, max_tokens, stop, n)
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion",
                    created=int(time.time()), model=model_id)
        choice = lambda i, t, r: dict(index=i, text=t, logprobs=None, finish_reason=r)  # noqa: E731
        return await respond(http, jobs, events, meta, choice, choice, stream)

    async def chat(http: HTTPRequest):
        body = await parse(http)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} strings", "messages")
        params, max_tokens, stop, n = sampling(body, llm.n_ctx)
        stream = _field(body, "stream", bool, False, what="a boolean")
        ids = llm._prompt_ids(llm._render_chat(messages), template=True)
        jobs, events = await run([ids], params, max_tokens, stop, n)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_id)
        whole = lambda i, t, r: dict(index=i, message=dict(role="assistant", content=t),  # noqa: E731
                                     logprobs=None, finish_reason=r)
        delta = lambda i, t, r: dict(index=i, delta=dict(content=t) if t else {},  # noqa: E731
                                     logprobs=None, finish_reason=r)
        meta_kind = "chat.completion.chunk" if stream else "chat.completion"
        return await respond(http, jobs, events, dict(meta, object=meta_kind), whole, delta, stream)

    async def models(http: HTTPRequest):
        if api_key is not None and http.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key", kind="authentication_error")
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "torchless"}]})

    async def health(http: HTTPRequest):
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(http: HTTPRequest):
        lines = [
            "# TYPE torchless_requests_total counter", f"torchless_requests_total {engine.requests_total}",
            "# TYPE torchless_tokens_generated_total counter",
            f"torchless_tokens_generated_total {engine.tokens_generated}",
            "# TYPE torchless_batch_size gauge", f"torchless_batch_size {engine.batch_size}",
            "# TYPE torchless_queue_depth gauge", f"torchless_queue_depth {engine.queue_depth}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def wrap(endpoint):
        async def handler(http: HTTPRequest):
            try:
                return await endpoint(http)
            except APIError as e:
                return e.response()
            except (TorchlessError, ValueError) as e:
                return APIError(400, str(e)).response()
        return handler

    app = Starlette(routes=[
        Route("/v1/completions", wrap(completions), methods=["POST"]),
        Route("/v1/chat/completions", wrap(chat), methods=["POST"]),
        Route("/v1/models", wrap(models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], lifespan=_closing(engine))
    app.state.engine = engine
    return app
