"""Continuous batching: one thread runs the model; requests join and leave at token boundaries.

Each step the engine admits waiting requests (their prompts prefilled together), then runs
one decode step of every running request as one micro-batch (`Mistral.forward_spans`: each
weight read once for the whole batch), or as the pipeline's micro-batches. A request
that finishes, or whose client goes away, leaves the batch and its KV cache is dropped.
Requests receive (text, finish_reason) events through a callback.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import TorchlessError
from ..kernels.gemm import single_threaded_blas
from ..model.mistral import Span
from ..sampling import Sampler, SamplingParams, StopStrings


PREFILL_CHUNK = 256  # prompt tokens per pass


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] | None
    emit: object  # emit(text, finish_reason): called on the engine thread
    completion_tokens: int = 0
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None


class ContinuousBatcher:
    def __init__(self, llm, max_batch: int = 8, log=None):
        model = llm.model
        # The pipeline on threads is served through its runner; the plain model directly.
        self._pipeline = model if hasattr(model, "runner") and not hasattr(model, "serve") else None
        if self._pipeline is None and not hasattr(model, "forward_spans"):
            raise TorchlessError("serve runs one process: the plain model or --parallel pp=S on "
                                 "threads (not tensor-parallel shards, not MPI ranks)")
        self.llm, self.model, self.max_batch = llm, model, max_batch
        self.log = log or (lambda message: None)
        self._waiting: deque[Request] = deque()
        self._running: list[tuple[Request, object, Sampler, object, StopStrings, list]] = []
        self._wake = threading.Condition()
        self.requests_total = 0
        self.tokens_generated = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="torchless-engine")
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        with self._wake:
            self._waiting.append(request)
            self.requests_total += 1
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True  # read by the engine at the next token boundary

    @property
    def batch_size(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # -- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        with single_threaded_blas():
            while True:
                with self._wake:
                    while not self._stopped and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopped:
                        return
                    admitted = []
                    while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                        admitted.append(self._waiting.popleft())
                self._admit([r for r in admitted if not r.cancelled])
                self._decode_step()

    def _admit(self, requests: list[Request]) -> None:
        """Prefill new prompts: the short ones together, as one micro-batch (each weight read
        once for all of them), a long one alone in chunks."""
        short = [r for r in requests if len(r.prompt_ids) <= PREFILL_CHUNK]
        groups = ([short] if short else []) + [[r] for r in requests if len(r.prompt_ids) > PREFILL_CHUNK]
        for group in groups:
            states = [self.model.new_state(len(r.prompt_ids) + r.max_tokens) for r in group]
            try:
                for i in range(0, max(len(r.prompt_ids) for r in group), PREFILL_CHUNK):
                    logits = self._forward([Span(st, r.prompt_ids[i:i + PREFILL_CHUNK], i)
                                            for r, st in zip(group, states)])
            except Exception as e:  # noqa: BLE001 - these requests fail, the engine goes on
                for r in group:
                    r.emit(None, f"error: {type(e).__name__}: {e}")
                continue
            for r, st, row in zip(group, states, logits):
                entry = (r, st, Sampler(r.params), self.llm.tokenizer.stream_decoder(),
                         StopStrings(r.stop), list(r.prompt_ids))
                if self._take(entry, row):
                    self._running.append(entry)

    def _decode_step(self) -> None:
        self._running = [e for e in self._running if not e[0].cancelled]
        if not self._running:
            return
        spans = [Span(state, [history[-1]], len(history) - 1)
                 for _, state, _, _, _, history in self._running]
        try:
            logits = self._forward(spans)
        except Exception as e:  # noqa: BLE001 - end these requests with the error, keep serving
            for entry in self._running:
                entry[0].emit(None, f"error: {type(e).__name__}: {e}")
            self._running = []
            return
        self._running = [entry for entry, row in zip(self._running, logits) if self._take(entry, row)]

    def _forward(self, spans: list[Span]) -> np.ndarray:
        """Logits of each span's last token: one pass of the plain model, or through the
        pipeline as its micro-batches, in flight at once (micro-batch k in stage 0 while k-1
        is in stage 1); the step then waits for all of them, since each needs its next token."""
        if self._pipeline is None:
            return self.model.forward_spans(spans)
        m = max(1, min(self._pipeline.n_micro_batches, len(spans)))
        bounds = np.linspace(0, len(spans), m + 1).round().astype(int)
        for k in range(m):
            self._pipeline.submit(k, spans[bounds[k]:bounds[k + 1]])
        parts = [None] * m
        for _ in range(m):
            k, logits = self._pipeline.collect()
            parts[k] = logits
        return np.concatenate(parts)

    def _take(self, entry, logits) -> bool:
        """Sample the next token of one request and emit its text; False when it has ended."""
        request, state, sampler, decoder, stops, history = entry
        if request.cancelled:
            return False
        token = sampler(logits, history)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.started
        if token in self.llm.tokenizer.eos_ids:
            return self._finish(request, stops.push(decoder.flush()) + stops.flush(), "stop")
        history.append(token)
        request.completion_tokens += 1
        self.tokens_generated += 1
        text = stops.push(decoder.push(token))
        if stops.stopped:
            return self._finish(request, text, "stop")
        if request.completion_tokens >= request.max_tokens:
            return self._finish(request, text + stops.push(decoder.flush()) + stops.flush(), "length")
        if text:
            request.emit(text, None)
        return True

    def _finish(self, request: Request, text: str, reason: str) -> bool:
        request.emit(text, reason)
        took = time.perf_counter() - request.started
        self.log(f"request done: {len(request.prompt_ids)} prompt + {request.completion_tokens} "
                 f"tokens in {took:.2f} s ({request.completion_tokens / took:.1f} tok/s), {reason}")
        return False
