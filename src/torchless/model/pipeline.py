"""Pipeline parallelism (seed 6.2) on threads: contiguous layer stages, each on its own worker.

A micro-batch (spans of one or several sequences, see `Mistral.run_layers`) enters stage 0,
which embeds it and runs its layers, then hands the hidden states to stage 1 through a queue,
and so on; the last stage computes the logits. Each later stage serves its queue in order, so
while stage k works on micro-batch i, stage k+1 works on micro-batch i-1. The compiled kernels
release the GIL, so the stages really run at once. The model code is the one `Mistral`: a
stage is a range of its layers.

Free-running, stage 0 runs on the thread that submits (the engine's), as rank 0 runs it under
MPI: the engine samples a micro-batch and runs it into stage 0 on the same thread, with no
hand-off between them and no third thread on the cores beside the stages'.

As a runner (runner.py) its depth is `n_micro_batches`: the engine keeps that many micro-batches
in flight, samples each as it leaves the last stage and sends its next tokens back in.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

import numba
import numpy as np

from ..errors import TorchlessError
from ..kernels.pipeline import PipelineConfig, PipelineState, predicted_bubble
from ..kernels.workdist import numba_threads
from .mistral import InferenceState, Mistral, Span, check_finite
from .runner import Runner


# The fewest rows a pipeline cuts a micro-batch to. A decode row alone costs nearly all of a
# step's weight reading; from about 4 rows on the batched kernels share it. On one thread
# a SmolLM2 decode micro-batch took 20 ms for 1 row, 31-36 ms for 4, 59-86 ms for 8; 8 prompts
# through pp=2 ran 1.19x the batched run at 1 thread as micro-batches of 4, 0.94x as 2x4 of 2
# (benchmarks/bench_pipeline.py --mb 2 against --mb 4).
MIN_ROWS = 4


def stage_bounds(layer_costs, n_stages: int, tail_cost: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous layer ranges of about equal cost. The last stage also pays `tail_cost` (the
    output projection: on a small model it weighs as much as several layers)."""
    n_layers = len(layer_costs)
    if not 1 <= n_stages <= n_layers:
        raise TorchlessError(f"pipeline of {n_stages} stages cannot split {n_layers} layers "
                             f"(1 to {n_layers} stages)")
    cum = np.concatenate([[0.0], np.cumsum(layer_costs, dtype=np.float64)])
    total = cum[-1] + tail_cost
    edges = [0]
    for k in range(1, n_stages):
        lo, hi = edges[-1] + 1, n_layers - (n_stages - k)  # every stage keeps at least one layer
        edges.append(min(range(lo, hi + 1), key=lambda i: abs(cum[i] - k * total / n_stages)))
    edges.append(n_layers)
    return list(zip(edges[:-1], edges[1:]))


def layer_costs(model: Mistral) -> tuple[list[int], int]:
    """Multiply-adds per token of each layer's products, and of the output projection. A
    pipeline pays off on micro-batches of several sequences, whose products are compute-bound
    (the batched kernels), so their cost follows the weight count, not the bytes: by
    bytes the Q8_0 head of SmolLM2 weighed 13.6 Q4_1 layers and its stage sat idle 30% of the
    time (benchmarks/bench_pipeline.py). Read from the tensor shapes: nothing is repacked."""
    def weights(linear):
        rows, cols = linear.shape
        return rows * cols
    return ([sum(weights(linear) for linear in layer.linears()) for layer in model.layers],
            weights(model.output))


class PipelineBuffers:
    """What both pipelines (threads here, MPI ranks in pipeline_mpi) share: the buffer budget of
    the micro-batches in flight, and the per-stage busy time that the bubble is measured from."""

    def __init__(self, model_config, config: PipelineConfig | None):
        self.config = model_config
        self.pipeline_config = config or PipelineConfig()
        self.n_micro_batches = self.pipeline_config.num_micro_batches
        self.in_flight_bytes = self.peak_in_flight_bytes = 0
        self._lock = threading.Lock()

    def _buffer_bytes(self, spans: list[Span]) -> int:
        # The hidden states handed between stages, double-buffered: PipelineConfig's own count.
        return PipelineConfig.micro_batch_bytes(self.config.hidden_size,
                                                tokens=sum(len(sp.tokens) for sp in spans))

    def _start_schedule(self, n_stages: int) -> None:
        # The seed's state machine keeps the books of the micro-batches in flight: at most
        # num_micro_batches, ids in submission order, leaving in that order.
        self.schedule = PipelineState(n_stages, self.n_micro_batches)
        self._outstanding = 0
        self.most_in_flight = 0  # micro-batches in flight at once, at most: what the bubble depends on

    def _count_in(self) -> None:
        self._outstanding += 1
        self.most_in_flight = max(self.most_in_flight, self._outstanding)

    def micro_batch_rows(self, running: int) -> int:
        """A fair share of the `num_micro_batches`, but no fewer than MIN_ROWS rows unless
        that would leave a stage without a micro-batch of its own."""
        fair = -(-running // self.n_micro_batches)
        one_per_stage = -(-running // self.schedule.num_stages)
        return max(1, fair, min(MIN_ROWS, one_per_stage))

    def has_room(self, spans: list[Span]) -> bool:
        return (self._outstanding < self.n_micro_batches and self.in_flight_bytes
                + self._buffer_bytes(spans) <= self.pipeline_config.memory_budget)

    def _enter(self) -> int:
        """A micro-batch enters stage 0 (free-running stages): the clock ticks until it can."""
        while not self.schedule.can_accept():
            if self.schedule.in_flight >= self.schedule.max_depth:
                raise TorchlessError(f"the pipeline already holds {self.schedule.max_depth} "
                                     "micro-batches (its num_micro_batches)")
            self.schedule.advance()
        self._count_in()
        return self.schedule.push()

    def _leave(self, mb: int) -> None:
        """Micro-batch `mb` left the last stage: it must be the oldest in flight."""
        while not self.schedule.has_output():
            self.schedule.advance()
        expected = self.schedule.pop()
        self._outstanding -= 1
        if mb != expected:
            raise TorchlessError(f"pipeline order broken: micro-batch {mb} left before {expected}")

    def _reserve(self, spans: list[Span]) -> None:
        for sp in spans:
            if sp.start + len(sp.tokens) > sp.state.max_seq_len:
                raise TorchlessError(f"sequence of {sp.start + len(sp.tokens)} tokens does not fit "
                                     f"the context of {sp.state.max_seq_len}")
        nbytes = self._buffer_bytes(spans)
        if nbytes > self.pipeline_config.memory_budget:
            raise TorchlessError(f"a micro-batch of {sum(len(sp.tokens) for sp in spans)} tokens needs "
                                 f"{nbytes} bytes of stage buffers, over the pipeline's memory "
                                 f"budget of {self.pipeline_config.memory_budget}")
        with self._lock:
            self.in_flight_bytes += nbytes
            self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self.in_flight_bytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.in_flight_bytes -= nbytes

    def reset_stats(self) -> None:
        self.busy_seconds = [0.0] * len(self.busy_seconds)
        self.most_in_flight = self._outstanding

    def bubble(self, wall_seconds: float) -> dict:
        """Per stage (here), the share of `wall_seconds` it sat idle, and the fill/drain
        prediction for this many stages and the most micro-batches that were in flight at once
        (fewer than num_micro_batches when micro_batch_rows kept them at MIN_ROWS)."""
        in_flight = self.most_in_flight or self.n_micro_batches
        return {"idle_share": [max(0.0, 1 - b / wall_seconds) for b in self.busy_seconds],
                "micro_batches": in_flight,
                "predicted": predicted_bubble(len(self.stages), in_flight)}


class PipelineParallelMistral(PipelineBuffers, Runner):
    """Stages as threads. With `async_execution` they run free: stage 0 on the thread that
    submits, each later stage on a thread of its own that takes the next micro-batch from its
    queue as soon as it is done with the last. Without it (the seed's default) they run
    in lockstep, the seed's clock: each tick every stage works on the micro-batch in its slot of
    the `PipelineState`, then all advance together (stage k on micro-batch i while stage k+1 is
    on i-1, as in GPipe)."""

    def __init__(self, model: Mistral, n_stages: int = 2, config: PipelineConfig | None = None,
                 threads_per_stage: int | None = None):
        from threadpoolctl import threadpool_limits

        super().__init__(model.config, config)
        self.model = model
        # Balance the stages by their multiply-adds (see layer_costs).
        costs, output_cost = layer_costs(model)
        self.stages = stage_bounds(costs, n_stages, output_cost)
        self._start_schedule(n_stages)
        self._pending: deque = deque()  # lockstep: submitted, waiting for stage 0's slot
        self._work: dict[int, tuple] = {}  # lockstep: micro-batch id -> (tag, spans, its hidden states)
        self.ticks: list[list[tuple[int, int]]] = []  # lockstep: (stage, micro-batch) at work per tick
        self._ready: deque = deque()    # lockstep: (tag, logits) out of the last stage
        threads_per_stage = threads_per_stage or max(1, numba.get_num_threads() // n_stages)
        # BLAS is the prefill's, per stage thread; its own pool would oversubscribe the cores.
        self._blas = threadpool_limits(limits=1, user_api="blas")
        self._inbox = [queue.Queue() for _ in self.stages]
        self._outbox: queue.Queue = queue.Queue()
        self._failed: str | None = None
        self.busy_seconds = [0.0] * n_stages
        self.threads_per_stage = threads_per_stage
        # free-running, stage 0 is the submitting thread's (see the module docstring)
        first = 1 if self.pipeline_config.async_execution else 0
        self._workers = [threading.Thread(target=self._serve, args=(k, threads_per_stage),
                                          daemon=True, name=f"torchless-pp{k}")
                         for k in range(first, n_stages)]
        for w in self._workers:
            w.start()

    @classmethod
    def load(cls, params, config=None) -> "PipelineParallelMistral":
        """The seed's load(params, ParallelConfig): its stages (at least 2) and micro-batches."""
        from .parallel import ParallelConfig

        config = config or ParallelConfig.pipeline(4)
        return cls(Mistral.load(params), max(2, config.pipeline_stages), config.pipeline_config)

    # -- the stage workers --------------------------------------------------------------------

    def _serve(self, k: int, n_threads: int):
        numba.set_num_threads(n_threads)  # per thread: each stage has its share of the cores
        while True:
            item = self._inbox[k].get()
            if item is None:
                return
            mb, tag, spans, x, reply = item
            result, error = self._run_stage(k, spans, x)
            if reply is not None:  # lockstep: the clock hands it on
                reply.put((mb, result, error))
            else:
                self._hand_on(k, mb, tag, spans, result, error)

    def _run_stage(self, k: int, spans: list[Span], x) -> tuple:
        """Stage k's layers on a micro-batch (stage 0 embeds it, the last computes the logits):
        (its output, None), or (None, what failed)."""
        start, stop = self.stages[k]
        t0 = time.perf_counter()
        try:
            if k == 0:
                x = self.model.embed([t for sp in spans for t in sp.tokens])
            x = self.model.run_layers(spans, x, start, stop, fast=True)
            result = self.model.finish(spans, x, fast=True) if k == len(self.stages) - 1 else x
            error = None
        except Exception as e:  # noqa: BLE001 - reported to the driver, with the stage
            result, error = None, f"pipeline stage {k} (layers {start}-{stop - 1}) failed: {type(e).__name__}: {e}"
        self.busy_seconds[k] += time.perf_counter() - t0
        return result, error

    def _hand_on(self, k: int, mb: int, tag, spans: list[Span], result, error) -> None:
        """Free-running: stage k's output to stage k + 1, or (logits or failure) to collect."""
        if error is not None or k == len(self.stages) - 1:
            self._outbox.put((mb, tag, result, error, self._buffer_bytes(spans)))
        else:
            self._inbox[k + 1].put((mb, tag, spans, result, None))

    # -- the runner interface ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.n_micro_batches

    def new_state(self, max_seq_len: int | None = None) -> InferenceState:
        state = self.model.new_state(max_seq_len)
        # Stage threads write different layers of one cache at once, and growing it would
        # replace the arrays under them: take its whole size now (pages come as written).
        state.cache.reserve(state.max_seq_len)
        return state

    def caches(self, state) -> list:
        return [state.cache]

    def submit(self, tag, spans: list[Span]) -> None:
        if self._failed:
            raise TorchlessError(f"the pipeline is stopped: {self._failed}")
        self._reserve(spans)
        if self.pipeline_config.async_execution:
            mb = self._enter()
            with numba_threads(self.threads_per_stage):  # stage 0's share of the cores, here
                result, error = self._run_stage(0, spans, None)
            self._hand_on(0, mb, tag, spans, result, error)
        else:
            self._count_in()
            self._pending.append((tag, spans))

    def collect(self, timeout: float = 600.0):
        if not self.pipeline_config.async_execution:
            while not self._ready:
                self._tick(timeout)
            self._outstanding -= 1
            return self._ready.popleft()
        try:
            mb, tag, logits, error, nbytes = self._outbox.get(timeout=timeout)
        except queue.Empty:
            self._failed = f"no micro-batch left the pipeline in {timeout:.0f} s"
            raise TorchlessError(f"the pipeline is stuck: {self._failed}") from None
        self._release(nbytes)
        if error is not None:
            # Stop here: a batch with a failed micro-batch is an error as a whole, never a
            # silently shortened output.
            self._failed = error
            raise TorchlessError(error)
        self._leave(mb)
        return tag, logits

    def _tick(self, timeout: float) -> None:
        """One clock tick of the lockstep pipeline: every occupied stage works at once, then
        the micro-batches advance one stage."""
        if self._pending and self.schedule.can_accept():
            tag, spans = self._pending.popleft()
            self._work[self.schedule.push()] = (tag, spans, None)
        if self.schedule.in_flight == 0:
            raise TorchlessError("collect: nothing was submitted to the pipeline")
        replies: queue.Queue = queue.Queue()
        busy = [(k, mb) for k, mb in enumerate(self.schedule.slots) if mb is not None]
        self.ticks.append(busy)
        for k, mb in busy:
            tag, spans, x = self._work[mb]
            self._inbox[k].put((mb, tag, spans, x, replies))
        for _ in busy:
            try:
                mb, result, error = replies.get(timeout=timeout)
            except queue.Empty:
                self._failed = f"a pipeline tick took over {timeout:.0f} s"
                raise TorchlessError(f"the pipeline is stuck: {self._failed}") from None
            if error is not None:
                self._failed = error
                raise TorchlessError(error)
            tag, spans, _ = self._work[mb]
            self._work[mb] = (tag, spans, result)
        self.schedule.advance()
        while self.schedule.has_output():
            tag, spans, logits = self._work.pop(self.schedule.pop())
            self._release(self._buffer_bytes(spans))
            self._ready.append((tag, logits))

    # -- the seed's one-sequence interface ------------------------------------------------------

    def prefill(self, state: InferenceState, tokens, chunk_size: int = 256,
                all_logits: bool = False) -> np.ndarray:
        """A prompt through the pipeline in chunks: chunk i+1 enters stage 0 while chunk i is
        in stage 1."""
        if all_logits:
            raise TorchlessError("the pipeline's prefill gives the last token's logits only")
        tokens = [int(t) for t in tokens]
        start = state.pos
        spans = [Span(state, tokens[i:i + chunk_size], start + i) for i in range(0, len(tokens), chunk_size)]
        in_flight = 0
        for i, sp in enumerate(spans):
            if in_flight and not self.has_room([sp]):  # within the memory budget, prefill too
                self.collect()
                in_flight -= 1
            self.submit(i, [sp])
            in_flight += 1
        for _ in range(in_flight):  # they leave in the order they went in
            _, logits = self.collect()
        state.logits[:] = logits[-1]
        return state.logits

    def forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """debug: the logits are checked to be finite (the stages' activations are not)."""
        self.submit("one", [Span(state, [int(token)], state.pos)])
        _, logits = self.collect()
        state.logits[:] = logits[-1]
        if debug:
            check_finite(state.logits, "the last stage")
        return state.logits

    fast_forward = forward

    def weight_bytes_per_token(self) -> int:
        return self.model.weight_bytes_per_token()

    def close(self) -> None:
        for inbox in self._inbox:
            inbox.put(None)
        self._blas.restore_original_limits()
