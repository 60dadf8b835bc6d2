"""`torchless serve`: OpenAI's completions and chat completions over HTTP, on Starlette.

Starlette (with uvicorn) because it is the small, well-kept ASGI toolkit under FastAPI: we need
routing, streaming responses and disconnect detection, not a schema framework; request bodies
are checked by hand so every error has OpenAI's shape. The server is a thin adapter: it
validates, renders the chat template, and hands token ids to the continuous batcher.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..api import MAX_LOGPROBS, chat_messages
from ..engine import Sequence
from ..errors import TorchlessError
from ..grammar import constrain, response_format_grammar
from ..logprobs import chat_logprobs, completion_logprobs, prompt_offsets
from ..sampling import Sampler
from ..tools import ToolCallStream, ToolError, reply_message, tool_request
from .engine import EngineThread, Request
from .fields import (CHAT_FIELDS, COMPLETION_FIELDS, DISCONNECT_POLL_S, DRAIN_BYTES, MAX_BODY_BYTES,
                     APIError, _field, _refuse)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics

def served_name(model_path: str) -> str:
    """The model's id in responses by default: a file's stem, a folder's name."""
    path = Path(model_path)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _closing(engine):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()
    return lifespan


def create_app(llm, max_batch: int = 8, api_key: str | None = None, log=None,
               model_name: str | None = None) -> Starlette:
    """model_name: the id in `model` fields and /v1/models (default: the model file's stem)."""
    log = log or (lambda m: print(f"torchless serve: {m}", file=sys.stderr, flush=True))
    llm.engine.scheduler.max_batch = max_batch
    engine = EngineThread(llm.engine, log)
    model_id = model_name or served_name(llm.model_path)
    metrics = engine.metrics = ServerMetrics(model_id, lambda: engine.batch_size,
                                             lambda: engine.queue_depth, llm.engine.prefix_cache)

    def check_key(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key", kind="authentication_error")

    async def parse(request: HTTPRequest) -> dict:
        check_key(request)
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

    def sampling(body: dict, default_max_tokens: int) -> tuple:
        """(SamplingParams, max_tokens, stop, n). OpenAI's defaults: temperature 1, top_p 1, no
        top_k, min_p or penalties (they apply only when the request sets them, as in vLLM);
        16 tokens for completions, up to the context for chat."""
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
        number = (int, float)
        repeat = "repetition_penalty" if body.get("repetition_penalty") is not None else "repeat_penalty"
        settings = dict(
            temperature=_field(body, "temperature", number, 1.0),
            top_p=_field(body, "top_p", number, 1.0),
            top_k=_field(body, "top_k", int, 0, what="an integer >= 0 (0: off)"),
            min_p=_field(body, "min_p", number, 0.0),
            repeat_penalty=_field(body, repeat, number, 1.0),
            repeat_last_n=_field(body, "repeat_last_n", int, 64, what="an integer >= -1"),
            presence_penalty=_field(body, "presence_penalty", number, 0.0),
            frequency_penalty=_field(body, "frequency_penalty", number, 0.0),
            logit_bias=_field(body, "logit_bias", dict, {}, what="a map of token ids to numbers"),
            seed=_field(body, "seed", int, None))
        try:
            params = llm.sampling_params(**settings)
        except (TorchlessError, ValueError) as e:
            name = next((k for k in settings if str(e).startswith(k)), None)
            raise APIError(400, str(e), name) from None
        return params, max_tokens, stop, n

    def stream_settings(body: dict) -> tuple[bool, bool]:
        """(stream, include_usage)."""
        stream = _field(body, "stream", bool, False, what="a boolean")
        options = body.get("stream_options")
        if options is None:
            return stream, False
        if not stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "'stream_options' supports only {\"include_usage\": bool} yet", "stream_options")
        return stream, _field(options, "include_usage", bool, False, what="a boolean")

    def top_count(body: dict, name: str, default=None):
        return _field(body, name, int, default, lambda v: 0 <= v <= MAX_LOGPROBS,
                      f"an integer from 0 to {MAX_LOGPROBS}")

    def check_fits(ids: list[int], max_tokens: int) -> int:
        n_ctx = llm.n_ctx
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", "prompt")
        if len(ids) >= n_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context is {n_ctx}",
                           "prompt", code="context_length_exceeded")
        return min(max_tokens, n_ctx - len(ids))

    async def run(prompts: list[list[int]], params, max_tokens, stop, n, logprobs=None, echo=False,
                  grammar=None, trigger=None):
        """Start every choice at once (they batch together) and stream or collect them.
        logprobs: alternatives to record per token (None: none); echo with logprobs: the
        prompt's too (scored on the engine thread when the request joins)."""
        if echo and logprobs is not None and not llm.engine.can_score_prompts:
            raise APIError(400, "'echo' with 'logprobs' is not supported with this --parallel "
                           "configuration yet", "echo")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, (ids, j) in enumerate((p, j) for p in prompts for j in range(n)):
            budget = check_fits(ids, max_tokens)
            emit = (lambda i: lambda text, reason, entries=(): loop.call_soon_threadsafe(
                events.put_nowait, (i, text, reason, list(entries))))(i)
            # n choices of one seeded request differ from each other, and repeat across calls
            own = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
            # response_format or tools: every token (from the trigger on) kept inside the grammar
            sampler = constrain(Sampler(own), llm.tokenizer, llm.config.vocab_size, grammar, trigger)
            seq = Sequence(ids, sampler, budget, llm.tokenizer.eos_ids,
                           llm.tokenizer.stream_decoder(), stop, index=i, logprobs=logprobs,
                           prompt_logprobs=echo and logprobs is not None)
            jobs.append(Request(seq, emit, prompt=ids))
        for job in jobs:
            engine.submit(job)
        return jobs, events

    def usage(jobs) -> dict:
        # a prompt is counted once, however many choices it has (n > 1)
        n = len(jobs) // len({id(j.prompt) for j in jobs})
        p = sum(j.prompt_tokens for j in jobs[::n])
        c = sum(j.completion_tokens for j in jobs)
        # OpenAI's count of prompt tokens found cached (here: in the prefix cache)
        cached = sum(j.seq.cached_tokens for j in jobs[::n])
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def respond(http, jobs, events, meta, make_choice, make_delta, stream,
                      include_usage=False, opening=None):
        """make_choice(i, text, reason): a whole choice. make_delta(i, text, reason, entries): a
        chunk's choice, a list of them, or None to send nothing; opening(i): chunks to send before a choice's
        first (the chat role, an echoed prompt)."""
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
                    i, text, reason, _ = item
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

        def line(choices, **extra):
            chunk = dict(meta, choices=choices, **extra)
            if include_usage:  # OpenAI: null on every chunk but the last
                chunk.setdefault("usage", None)
            return f"data: {json.dumps(chunk)}\n\n"

        async def sse():
            left, opened = len(jobs), set()
            try:
                while left:
                    i, text, reason, entries = await events.get()
                    if reason is not None and reason.startswith("error"):
                        # OpenAI's way: an error object in the stream, then the end of it
                        error = {"message": reason[len("error: "):], "type": "server_error",
                                 "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    if opening is not None and i not in opened:
                        opened.add(i)
                        for choice in opening(i):
                            yield line([choice])
                    if reason is not None:
                        left -= 1
                    choices = make_delta(i, text or "", reason, entries)
                    for choice in [choices] if isinstance(choices, dict) else choices or ():
                        yield line([choice])
                if not left and include_usage:
                    yield line([], usage=usage(jobs))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free its sequences
                for job in jobs:
                    engine.cancel(job)

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def completions(http: HTTPRequest):
        body = await parse(http)
        _refuse(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
        params, max_tokens, stop, n = sampling(body, 16)
        stream, include_usage = stream_settings(body)
        logprobs = top_count(body, "logprobs")
        echo = _field(body, "echo", bool, False, what="a boolean")
        ids = [llm.tokenize(p) for p in prompts]
        jobs, events = await run(ids, params, max_tokens, stop, n, logprobs, echo)
        prompt_of = [prompts[i // n] for i in range(len(jobs))]
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion",
                    created=int(time.time()), model=model_id)

        def prompt_part(i):  # an echoed prompt's logprobs
            seq = jobs[i].seq
            return completion_logprobs(llm.tokenizer, [], 0, seq.prompt_logprobs,
                                       prompt_offsets(llm.tokenizer, seq.prompt_ids))

        def choice(i, text, reason):
            seq, lp = jobs[i].seq, None
            if logprobs is not None:
                lp = completion_logprobs(llm.tokenizer, seq.token_logprobs, len(prompt_of[i]),
                                         *((seq.prompt_logprobs, prompt_offsets(llm.tokenizer, seq.prompt_ids))
                                           if echo else ()))
            return dict(index=i, text=(prompt_of[i] if echo else "") + text, logprobs=lp, finish_reason=reason)

        def delta(i, text, reason, entries):
            lp = None if logprobs is None else completion_logprobs(llm.tokenizer, entries, len(prompt_of[i]))
            return dict(index=i, text=text, logprobs=lp, finish_reason=reason)

        def opening(i):
            lp = prompt_part(i) if logprobs is not None else None
            return [dict(index=i, text=prompt_of[i], logprobs=lp, finish_reason=None)]

        return await respond(http, jobs, events, meta, choice, delta, stream, include_usage,
                             opening if echo else None)

    async def chat(http: HTTPRequest):
        body = await parse(http)
        _refuse(body, CHAT_FIELDS)
        try:
            messages = chat_messages(body.get("messages"))
        except TorchlessError as e:
            raise APIError(400, str(e), "messages") from None
        params, max_tokens, stop, n = sampling(body, llm.n_ctx)
        stream, include_usage = stream_settings(body)
        want_logprobs = _field(body, "logprobs", bool, False, what="a boolean")
        top = top_count(body, "top_logprobs")
        if top is not None and not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want_logprobs else None
        try:
            tools = tool_request(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
            calling = tools is not None and tools.calls_tools
            if calling and body.get("response_format") not in (None, {"type": "text"}):
                raise APIError(400, "'response_format' cannot be combined with tools (unless "
                               "tool_choice is 'none')", "response_format")
            ids = llm._prompt_ids(llm._render_chat(messages, tools), template=True)
            grammar, trigger = tools.grammar(llm.tokenizer, llm.config.vocab_size) if calling else (None, None)
        except ToolError as e:
            raise APIError(400, str(e), e.param) from None
        try:
            if not calling:
                grammar = response_format_grammar(body.get("response_format"), llm.tokenizer, llm.config.vocab_size)
        except TorchlessError as e:
            raise APIError(400, str(e), "response_format") from None
        jobs, events = await run([ids], params, max_tokens, stop, n, logprobs, grammar=grammar, trigger=trigger)
        streams = [ToolCallStream(tools) for _ in jobs] if calling else None
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_id)

        def chat_lp(entries):
            return None if logprobs is None else dict(content=chat_logprobs(llm.tokenizer, entries),
                                                      refusal=None)

        def whole(i, text, reason):
            message, reason = reply_message(text, reason, tools)
            return dict(index=i, message=message, logprobs=chat_lp(jobs[i].seq.token_logprobs),
                        finish_reason=reason)

        def delta(i, text, reason, entries):
            if streams is not None:  # text through ToolCallStream: content or tool-call deltas
                deltas, reason = streams[i].step(text, reason)
                out = [dict(index=i, delta=d, logprobs=chat_lp(entries) if entries and not k else None,
                            finish_reason=None) for k, d in enumerate(deltas)]
                return out + ([dict(index=i, delta={}, logprobs=None, finish_reason=reason)]
                              if reason is not None else [])
            if not text and not entries and reason is None:
                return None
            return dict(index=i, delta=dict(content=text) if text or entries else {},
                        logprobs=chat_lp(entries) if entries else None, finish_reason=reason)

        def opening(i):  # OpenAI's first chunk of a choice: the role
            return [dict(index=i, delta=dict(role="assistant", content=""), logprobs=None,
                         finish_reason=None)]

        meta_kind = "chat.completion.chunk" if stream else "chat.completion"
        return await respond(http, jobs, events, dict(meta, object=meta_kind), whole, delta, stream,
                             include_usage, opening)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "torchless"}

    async def models(http: HTTPRequest):
        check_key(http)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(http: HTTPRequest):
        check_key(http)
        name = http.path_params["name"]
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist", "model", code="model_not_found")
        return JSONResponse(model_card())

    async def tokenize(http: HTTPRequest):
        """llama.cpp's {"content", "add_special", "with_pieces"} or vLLM's {"prompt",
        "add_special_tokens"} (each with its own default for adding BOS) -> {"tokens": [...]}."""
        body = await parse(http)
        key = "content" if "content" in body else "prompt"
        text = body.get(key)
        if not isinstance(text, str):
            raise APIError(400, "'content' (or 'prompt') must be a string", key)
        special = "add_special" if key == "content" else "add_special_tokens"
        add = _field(body, special, bool, key == "prompt", what="a boolean")
        ids = llm.tokenize(text, add_bos=add)
        tokens = ids
        if _field(body, "with_pieces", bool, False, what="a boolean"):
            decoded = [llm.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids]
            tokens = [{"id": t, "piece": piece} for t, piece in zip(ids, decoded)]
        return JSONResponse({"tokens": tokens, "count": len(ids), "max_model_len": llm.n_ctx})

    async def embeddings(http: HTTPRequest):
        """OpenAI's /v1/embeddings: `input` a text, a list of texts, a list of token ids or a
        list of those; each the unit-length mean of its final hidden states, computed on the
        engine thread between steps."""
        body = await parse(http)
        _refuse(body, {"input", "model", "encoding_format", "user", "dimensions"})
        texts = body.get("input")
        if isinstance(texts, (str, dict)) or not isinstance(texts, list) or not texts:
            texts = [texts]
        ids_ok = lambda v: isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)  # noqa: E731
        if ids_ok(texts):
            texts = [texts]
        if not all(isinstance(t, str) and t or ids_ok(t) for t in texts):
            raise APIError(400, "'input' must be a non-empty string, a list of them, or token ids", "input")
        fmt = _field(body, "encoding_format", str, "float", lambda v: v in ("float", "base64"),
                     what="'float' or 'base64'")
        if body.get("dimensions") is not None:
            raise APIError(400, "'dimensions' is not supported (the model's hidden size is the only one)", "dimensions")
        try:
            out = await asyncio.wrap_future(engine.call(lambda: llm._embeddings(texts, model_id)))
        except TorchlessError as e:
            raise APIError(400, str(e), "input") from None
        if fmt == "base64":
            for item in out["data"]:
                item["embedding"] = base64.b64encode(np.asarray(item["embedding"], "<f4").tobytes()).decode()
        return JSONResponse(out)

    async def detokenize(http: HTTPRequest):
        body = await parse(http)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        bad = [t for t in ids if not 0 <= t < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                f"(0..{llm.config.vocab_size - 1})", "tokens")
        return JSONResponse({"content": llm.detokenize(ids)})

    async def health(http: HTTPRequest):
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(http: HTTPRequest):
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

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
        Route("/v1/models/{name:path}", wrap(model), methods=["GET"]),
        Route("/tokenize", wrap(tokenize), methods=["POST"]),
        Route("/v1/embeddings", wrap(embeddings), methods=["POST"]),
        Route("/detokenize", wrap(detokenize), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ], lifespan=_closing(engine))
    app.state.engine = engine
    return app
