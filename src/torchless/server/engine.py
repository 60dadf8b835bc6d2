"""The server's engine thread: one thread steps the engine; requests join and leave it.

HTTP handlers run on the event loop and never touch the engine: they hand requests in through a
queue and are told what happened through each request's `emit(text, finish_reason)` callback,
called on the engine thread. Each engine step admits what is waiting (up to `max_batch`
sequences decode together, each weight read once per micro-batch for all of them), runs one
micro-batch and emits its text. A request whose client goes away is cancelled at the next step
and its KV cache released. If the engine itself fails, every request in it gets an error and the
thread stops; `alive` then turns false and /health reports it.

The engine thread should be the only thread of the process that has run the model at more than
one numba thread: every such thread keeps a team of OpenMP workers, and once there are more
workers than cores libgomp stops them spinning between parallel loops, which cost the engine a
fifth of its speed (`torchless serve` warms the kernels up on a thread that ends: cli._warm_up).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
import threading
import time
from dataclasses import dataclass, field

import numba

from ..engine import Engine, Sequence
from ..errors import TorchlessError
from ..kernels.gemm import single_threaded_blas


@dataclass
class Request:
    seq: Sequence
    # emit(text, finish_reason, logprobs=()): called on the engine thread; "error: ..." on
    # failure. logprobs: the entries the sequence recorded since the last emit (if it records)
    emit: object
    prompt: list | None = None  # the request's prompt ids, shared by its n choices
    logprobs_sent: int = 0
    tokens_counted: int = 0  # completion tokens the metrics have seen
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.seq.completion_tokens


class EngineThread:
    def __init__(self, engine: Engine, log=None):
        if engine.served_by is not None:
            raise TorchlessError("this engine is already serving: one server per LLM")
        engine.served_by = self  # only this thread steps it now (LLM refuses direct calls)
        self.engine, self.log = engine, log or (lambda message: None)
        self.metrics = None  # a ServerMetrics, observed as events pass (set before requests come)
        self._inbox: queue.Queue = queue.Queue()
        self._requests: dict[int, Request] = {}  # seq_id -> request, on the engine thread only
        self.requests_total = 0
        self.error: str | None = None
        self._stopped = False
        # numba's thread count is per thread, and a new one starts with all the cores: the
        # engine thread takes its creator's (--threads)
        self._threads = numba.get_num_threads()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="torchless-engine")
        self._thread.start()

    # -- the caller's side (any thread) --------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if not self.alive:
            request.emit(None, f"error: the engine has stopped: {self.error}")
            return request
        self.requests_total += 1
        self._inbox.put(request)
        return request

    def call(self, fn) -> Future:
        """Run fn() on the engine thread between steps (it may use the model, which only that
        thread touches); its result or exception comes back through the Future."""
        future: Future = Future()
        if not self.alive:
            future.set_exception(TorchlessError(f"the engine has stopped: {self.error}"))
        else:
            self._inbox.put((fn, future))
        return future

    def cancel(self, request: Request) -> None:
        if not request.cancelled and not request.seq.finished:
            request.cancelled = True
            self._inbox.put(request)  # the engine thread cancels it at its next step

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth + self._inbox.qsize()

    @property
    def tokens_generated(self) -> int:
        return self.engine.tokens_generated

    def close(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.engine.served_by = None

    # -- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        numba.set_num_threads(self._threads)
        with single_threaded_blas():
            try:
                while not self._stopped:
                    self._take_inbox(block=not self.engine.has_work())
                    for event in self.engine.step():
                        self._dispatch(event)
            except Exception as e:  # noqa: BLE001 - the engine is broken: fail everyone, say so
                self.error = f"{type(e).__name__}: {e}"
                self.log(f"engine stopped: {self.error}")
                for request in list(self._requests.values()):
                    request.emit(None, f"error: {self.error}")
                while not self._inbox.empty():
                    request = self._inbox.get()
                    if isinstance(request, tuple):  # call(fn)
                        request[1].set_exception(TorchlessError(f"the engine has stopped: {self.error}"))
                    elif request is not None and not request.cancelled:
                        request.emit(None, f"error: {self.error}")

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                request = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if request is None:
                return
            if isinstance(request, tuple):  # call(fn)
                fn, future = request
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    future.set_exception(e)
                continue
            if request.cancelled:
                self._requests.pop(request.seq.seq_id, None)
                self.engine.cancel(request.seq)
            else:
                try:
                    self.engine.add(request.seq)  # (with echo and logprobs, scores the prompt)
                except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on
                    why = str(e) if isinstance(e, TorchlessError) else f"{type(e).__name__}: {e}"
                    request.emit(None, f"error: {why}")
                    continue
                self._requests[request.seq.seq_id] = request

    def _dispatch(self, event) -> None:
        request = self._requests.get(event.seq.seq_id)
        if request is None:  # cancelled
            return
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter() - request.started
        entries = event.seq.token_logprobs[request.logprobs_sent:]
        request.logprobs_sent += len(entries)
        if self.metrics is not None:
            new = request.completion_tokens - request.tokens_counted
            request.tokens_counted += new
            if new:
                self.metrics.token(request, new)
            if event.finish_reason not in (None, "error"):
                self.metrics.finished(request, event.finish_reason)
        if event.finish_reason is None:
            if event.text or entries:
                request.emit(event.text, None, entries)
            return
        del self._requests[event.seq.seq_id]
        if event.finish_reason == "error":
            request.emit(None, f"error: {event.error}")
            self.log(f"request failed: {event.error}")
            return
        request.emit(event.text, event.finish_reason, entries)
        took = time.perf_counter() - request.started
        n = request.completion_tokens
        self.log(f"request done: {request.prompt_tokens} prompt + {n} tokens in {took:.2f} s "
                 f"({n / took:.1f} tok/s), {event.finish_reason}")
