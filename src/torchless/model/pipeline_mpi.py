"""Pipeline parallelism over MPI ranks, as a runner: rank k runs stage k's layers, and holds
only those.

Rank 0 runs the engine. For each micro-batch it embeds the tokens, runs its layers and sends
the hidden states on with a non-blocking send, then goes on to the next micro-batch while rank
1 works on this one. Each later rank receives, runs its layers and sends on; the last computes
the logits and sends them back to rank 0, which samples. A message carries, per span, a key
naming the sequence (each rank keeps its own KV cache for it), the start position, the tokens
and the length limit, plus the keys of sequences that are done, so no rank needs to be told
anything else. Between calls the other ranks wait in `follow()`.

With tp > 1 each stage is itself `tp` tensor-parallel ranks (world rank = stage * tp + shard),
all-reducing over their own communicator; shard r of a stage talks only to shard r of the next,
since every shard holds the whole hidden state after its all-reduce. Rank 0 broadcasts each
micro-batch to the other shards of stage 0; shard 0 of the last stage returns the logits.

A stage that fails ends the job, naming its rank: the other ranks would otherwise wait for it.
"""

from __future__ import annotations

import time

from ..errors import TorchlessError
from ..kernels.pipeline import PipelineConfig
from ..loader import release_pages
from .mistral import Mistral, Span, check_finite
from .pipeline import PipelineBuffers, layer_costs, stage_bounds
from .runner import Runner
from .tp_mpi import CLOSE, END, STEP, RankStates

DATA, RESULT = 11, 12


class MPIPipelineMistral(PipelineBuffers, Runner):
    def __init__(self, model: Mistral, group, config: PipelineConfig | None = None, tp: int = 1):
        config = config or PipelineConfig(async_execution=True)
        if not config.async_execution:
            raise TorchlessError("a pipeline of MPI ranks runs its stages asynchronously (each "
                                 "rank takes the next micro-batch when it is done): "
                                 "PipelineConfig(async_execution=True)")
        super().__init__(model.config, config)
        self.group, self.comm = group, group.comm
        n_stages = group.world_size // tp
        self.stage, self.shard = divmod(group.rank, tp)
        self.stage_comm = None
        if tp > 1:
            from ..distributed import MPIGroup
            from ..kernels.tensor_parallel import TensorParallelConfig
            from .parallel import TensorParallelMistral

            self.stage_comm = self.comm.Split(color=self.stage, key=self.shard)
            model = TensorParallelMistral.shard(model, TensorParallelConfig(tp, self.shard),
                                                MPIGroup(self.stage_comm), prepare=False)
        self.model, self.config = model, model.config
        costs, output_cost = layer_costs(model)
        self.stages = stage_bounds(costs, n_stages, output_cost)
        self._start_schedule(n_stages)
        self.last_stage = n_stages - 1
        self.prev, self.next = group.rank - tp, group.rank + tp
        self.result_rank = self.last_stage * tp  # shard 0 of the last stage returns the logits
        self.start, self.stop = self.stages[self.stage]
        self.is_driver = group.rank == 0
        # Repack this stage's weights only; the other layers' pages are never read.
        mine = [linear for li in range(self.start, self.stop) for linear in model.layers[li].linears()]
        for linear in mine + ([model.output] if self.stage == self.last_stage else []):
            linear.packed
            release_pages(linear.weight.data)
        self.busy_seconds = [0.0]
        self.states = RankStates(model)
        self._sends: list = []

    @classmethod
    def load(cls, params, group, config: PipelineConfig | None = None, tp: int = 1) -> "MPIPipelineMistral":
        return cls(Mistral.load(params, fast=False), group, config, tp)

    @property
    def depth(self) -> int:
        return self.n_micro_batches

    def new_state(self, max_seq_len: int):
        return self.states.new(max_seq_len)

    def release(self, state) -> None:
        self.states.done.append(state.key)

    def cache_bytes(self, n_tokens: int) -> int:
        return super().cache_bytes(n_tokens) * (self.stop - self.start) // self.config.n_layers

    def _send(self, obj, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(obj, dest=dest, tag=tag))

    def _flush_sends(self) -> None:
        for r in self._sends:
            r.wait()
        self._sends.clear()

    # -- every rank: one message through this stage ---------------------------------------------

    def _handle(self, message) -> str:
        """Run this stage on a message and pass it on; returns its kind."""
        if self.stage_comm is not None and self.stage == 0:
            message = self.stage_comm.bcast(message, root=0)  # rank 0 to the other shards of stage 0
        kind, tag, meta, done, x = message
        self.states.drop(done)
        if kind == STEP:
            spans = self.states.spans(meta)
            t0 = time.perf_counter()
            try:
                if x is None:
                    x = self.model.embed([t for sp in spans for t in sp.tokens])
                x = self.model.run_layers(spans, x, self.start, self.stop, fast=True)
                for sp in spans:  # this stage's caches hold the span now
                    sp.state.cache.advance(sp.start + len(sp.tokens))
                if self.stage == self.last_stage:
                    x = self.model.finish(spans, x, fast=True)
            except Exception as e:  # noqa: BLE001 - the other stages wait on us: end the job
                self.group.abort(f"pipeline stage {self.stage} (layers {self.start}-{self.stop - 1}) "
                                 f"failed: {type(e).__name__}: {e}")
            self.busy_seconds[0] += time.perf_counter() - t0
            if self.stage == self.last_stage:
                if self.shard == 0:
                    self._send((tag, x, self._buffer_bytes(spans)), 0, RESULT)
                return kind
        if self.stage != self.last_stage:
            self._send((kind, tag, meta, done, x), self.next, DATA)
        return kind

    # -- rank 0: the runner interface -------------------------------------------------------------

    def submit(self, tag, spans: list[Span]) -> None:
        self._reserve(spans)
        self._handle((STEP, (self._enter(), tag), self.states.describe(spans), self.states.take_done(), None))

    def collect(self):
        (mb, tag), logits, nbytes = self.comm.recv(source=self.result_rank, tag=RESULT)
        self._release(nbytes)
        self._leave(mb)
        return tag, logits

    def end_call(self) -> None:
        self._handle((END, None, [], self.states.take_done(), None))
        self._flush_sends()

    def close(self) -> None:
        """Release the ranks waiting in `follow()` for good (rank 0, once)."""
        if self.is_driver and not getattr(self, "_closed", False):
            self._closed = True
            self._handle((CLOSE, None, [], self.states.take_done(), None))
            self._flush_sends()

    # -- the other ranks ------------------------------------------------------------------------

    def follow(self) -> bool:
        while True:
            if self.stage == 0:
                kind = self._handle(None)  # the stage broadcast brings rank 0's message
            else:
                kind = self._handle(self.comm.recv(source=self.prev, tag=DATA))
            if kind != STEP:
                self._flush_sends()
                return kind == END

    # -- the seed's one-sequence interface (rank 0, while the others follow) ---------------------

    def forward(self, state, token: int, debug: bool = False):
        """debug: the logits are checked to be finite (the stages' activations are not)."""
        self.submit("one", [Span(state, [int(token)], state.pos)])
        _, logits = self.collect()
        state.logits[:] = logits[-1]
        if debug:
            check_finite(state.logits, "the last stage")
        return state.logits

    fast_forward = forward
