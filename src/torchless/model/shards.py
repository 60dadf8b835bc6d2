"""Tensor-parallel shards as threads of one process, driven in lockstep.

Each shard is a TensorParallelMistral on its own persistent thread, joined to the others by a
ThreadGroup (a shared-memory all-reduce). The caller sees one model: `prefill`, `forward` and
`fast_forward` run the call on every shard and return rank 0's logits, which after the final
all-reduce are the whole model's; as a runner, each micro-batch runs on every shard at once.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

import numba

from collections import deque

from ..distributed import GroupAbortedError, ThreadGroup
from ..errors import TorchlessError
from ..kernels.gemm import single_threaded_blas
from ..kernels.tensor_parallel import TensorParallelConfig
from .mistral import Mistral, Span
from .parallel import ParallelConfig, ParallelInferenceState, TensorParallelMistral
from .runner import Runner


class ThreadedTensorParallel(Runner):
    def __init__(self, full: Mistral, world_size: int, timeout: float = 60.0,
                 tp: TensorParallelConfig | None = None):
        """tp: the strategies to split by (its world_size and rank are this object's)."""
        self.config = full.config
        self.groups = ThreadGroup.create(world_size, timeout=timeout)
        tp = tp or TensorParallelConfig()
        self.shards = [TensorParallelMistral.shard(full, replace(tp, world_size=world_size, rank=r), g)
                       for r, g in enumerate(self.groups)]
        self.model = self  # the seed's one-sequence interface is this object's own
        self._done = deque()
        threads_each = max(1, numba.get_num_threads() // world_size)
        self._inbox = [queue.Queue() for _ in self.shards]
        self._outbox: queue.Queue = queue.Queue()
        self._workers = [threading.Thread(target=self._serve, args=(r, threads_each), daemon=True,
                                          name=f"torchless-tp{r}") for r in range(world_size)]
        for w in self._workers:
            w.start()

    @classmethod
    def load(cls, params, world_size: int, tp: TensorParallelConfig | None = None) -> "ThreadedTensorParallel":
        return cls(Mistral.load(params, fast=False), world_size, tp=tp)

    def _serve(self, rank: int, n_threads: int):
        numba.set_num_threads(n_threads)  # per calling thread: each shard gets its share of cores
        while True:
            call = self._inbox[rank].get()
            if call is None:
                return
            name, args_of = call
            try:
                with single_threaded_blas():
                    result = getattr(self.shards[rank], name)(*args_of(rank))
                self._outbox.put((rank, result, None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, others released
                if not isinstance(e, GroupAbortedError):
                    try:  # releases the other shards from their collectives; raises by design
                        self.groups[rank].abort(f"{type(e).__name__}: {e}")
                    except GroupAbortedError:
                        pass
                self._outbox.put((rank, None, e))

    def _run(self, name: str, args_of):
        """Call shard.name(*args_of(rank)) on every shard at once; rank 0's result."""
        for inbox in self._inbox:
            inbox.put((name, args_of))
        results, errors = {}, []
        for _ in self.shards:
            rank, result, error = self._outbox.get()
            results[rank] = result
            if error is not None:
                errors.append((rank, error))
        if errors:
            real = [(r, e) for r, e in errors if not isinstance(e, GroupAbortedError)] or errors
            rank, error = real[0]
            if isinstance(error, TorchlessError):
                raise error
            raise TorchlessError(f"tensor-parallel rank {rank} failed: {type(error).__name__}: {error}") from error
        return results[0]

    def new_state(self, max_seq_len: int | None = None) -> ParallelInferenceState:
        return ParallelInferenceState(
            self.config, ParallelConfig.tensor_parallel(len(self.shards)),
            states=[shard.new_state(max_seq_len) for shard in self.shards])

    def caches(self, state) -> list:
        return [shard_state.cache for shard_state in state.states]

    def forward(self, state, token: int, debug: bool = False):
        return self._run("forward", lambda r: (state.states[r], token, debug))

    def fast_forward(self, state, token: int, debug: bool = False):
        return self._run("fast_forward", lambda r: (state.states[r], token, debug))

    def prefill(self, state, tokens, chunk_size: int = 256, all_logits: bool = False):
        tokens = list(tokens)
        return self._run("prefill", lambda r: (state.states[r], tokens, chunk_size, all_logits))

    # -- the runner interface ---------------------------------------------------------------

    def submit(self, tag, spans: list[Span]) -> None:
        def shard_spans(r):
            return ([Span(sp.state.states[r], sp.tokens, sp.start) for sp in spans],)
        try:
            self._done.append((tag, self._run("forward_spans", shard_spans)))
        except Exception as e:  # noqa: BLE001 - this micro-batch fails, the shards go on
            self._done.append((tag, e))

    def collect(self):
        return self._done.popleft()

    def linears(self) -> list:
        return [linear for shard in self.shards for linear in shard.linears()]

    def weight_bytes_per_token(self) -> int:
        return sum(shard.weight_bytes_per_token() for shard in self.shards)  # this process reads all

    def close(self):
        for inbox in self._inbox:
            inbox.put(None)
