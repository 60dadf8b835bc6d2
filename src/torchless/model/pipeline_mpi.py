"""Pipeline parallelism over MPI ranks: rank k runs stage k's layers, and holds only those.

Rank 0 drives the batch (generate.BatchGenerator): for each micro-batch it embeds the tokens,
runs its layers and sends the hidden states on with a non-blocking send, then goes on to the
next micro-batch while rank 1 works on this one. Each later rank receives, runs its layers and
sends on. The last rank computes the logits and samples, with the samplers of the same
`LLM` call (every rank runs it), and sends the tokens back to rank 0; logits never travel,
except through the seed's one-sequence `forward`.

A message carries, per span, a key naming the sequence (each rank keeps its own KV cache for
it), the start position and the tokens, so no rank needs to be told anything else.
"""

from __future__ import annotations

import time

from ..errors import TorchlessError
from ..kernels.pipeline import PipelineConfig
from ..loader import release_pages
from .mistral import InferenceState, Mistral, Span
from .pipeline import PipelineBuffers, layer_costs, stage_bounds

DATA, RESULT = 11, 12


class MPIPipelineMistral(PipelineBuffers):
    """One rank's part of the pipeline. With tp > 1 each stage is itself `tp` tensor-parallel
    ranks (world rank = stage * tp + shard), all-reducing over their own communicator; shard r
    of a stage talks only to shard r of the next, since every shard holds the whole hidden
    state after its all-reduce."""

    def __init__(self, model: Mistral, group, config: PipelineConfig | None = None, tp: int = 1):
        super().__init__(model.config, config)
        self.group, self.comm = group, group.comm
        n_stages = group.world_size // tp
        self.stage, shard = divmod(group.rank, tp)
        if tp > 1:
            from ..distributed import MPIGroup
            from ..kernels.tensor_parallel import TensorParallelConfig
            from .parallel import TensorParallelMistral

            stage_group = MPIGroup(self.comm.Split(color=self.stage, key=shard))
            model = TensorParallelMistral.shard(model, TensorParallelConfig(tp, shard), stage_group,
                                                prepare=False)
        self.model = model
        costs, output_cost = layer_costs(model)
        self.stages = stage_bounds(costs, n_stages, output_cost)
        self.last_stage = n_stages - 1
        self.prev, self.next = group.rank - tp, group.rank + tp
        self.driver_rank = shard  # shard r of stage 0: where this shard's tokens go
        self.sampler_rank = self.last_stage * tp + shard  # and where they come from
        self.start, self.stop = self.stages[self.stage]
        # Repack this stage's weights only; the other layers' pages are never read.
        mine = [getattr(model.layers[li], kind) for li in range(self.start, self.stop)
                for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        for linear in mine + ([model.output] if self.stage == self.last_stage else []):
            linear.packed
            release_pages(linear.weight.data)
        self.busy_seconds = [0.0]
        self._keys: dict[int, tuple[int, InferenceState]] = {}  # rank 0: id(state) -> key
        self._states: dict[int, InferenceState] = {}            # other ranks: key -> state
        self._sends: list = []
        self._pending = 0

    @classmethod
    def load(cls, params, group, config: PipelineConfig | None = None, tp: int = 1) -> "MPIPipelineMistral":
        return cls(Mistral.load(params, fast=False), group, config, tp)

    @property
    def is_driver(self) -> bool:
        return self.stage == 0

    def new_state(self, max_seq_len: int | None = None) -> InferenceState:
        return self.model.new_state(max_seq_len)

    def _send(self, obj, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(obj, dest=dest, tag=tag))

    # -- rank 0: the runner interface (generate.BatchGenerator) -------------------------------

    def runner(self) -> "MPIPipelineMistral":
        return self

    def submit(self, tag, spans: list[Span]) -> None:
        self._reserve(spans)
        t0 = time.perf_counter()
        x = self.model.embed([t for sp in spans for t in sp.tokens])
        x = self.model.run_layers(spans, x, self.start, self.stop, fast=True)
        self.busy_seconds[0] += time.perf_counter() - t0
        meta = [(self._key(sp.state), sp.start, sp.tokens, sp.state.max_seq_len) for sp in spans]
        self._send((tag, meta, x), self.next, DATA)
        self._pending += 1

    def collect(self):
        tag, result, nbytes = self.comm.recv(source=self.sampler_rank, tag=RESULT)
        self._pending -= 1
        self._release(nbytes)
        return tag, result

    def _key(self, state: InferenceState) -> int:
        entry = self._keys.setdefault(id(state), (len(self._keys), state))  # keeps the state alive
        return entry[0]

    def end_batch(self) -> None:
        """Rank 0: drain what is still in flight (a stream closed early), then tell the other
        ranks the batch is over so they drop its KV caches and return from `serve`."""
        while self._pending:
            self.collect()
        self._keys.clear()
        self._send(None, self.next, DATA)
        for r in self._sends:
            r.wait()
        self._sends.clear()

    # -- the other ranks ------------------------------------------------------------------------

    def serve(self, samplers=None, histories=None) -> None:
        """Ranks 1..: run this stage on every micro-batch until rank 0 ends the batch. The last
        rank samples with `samplers[s](logits, histories[s])` (appending each token to
        histories[s]), or without samplers sends the logits back (the seed's forward)."""
        last = self.stage == self.last_stage
        while True:
            msg = self.comm.recv(source=self.prev, tag=DATA)
            if msg is None:
                if not last:
                    self._send(None, self.next, DATA)
                for r in self._sends:
                    r.wait()
                self._sends.clear()
                self._states.clear()
                return
            tag, meta, x = msg
            spans = [Span(self._state(key, max_len), tokens, start) for key, start, tokens, max_len in meta]
            t0 = time.perf_counter()
            x = self.model.run_layers(spans, x, self.start, self.stop, fast=True)
            if not last:
                self.busy_seconds[0] += time.perf_counter() - t0
                self._send((tag, meta, x), self.next, DATA)
                continue
            logits = self.model.finish(spans, x, fast=True)
            result = logits if samplers is None else _sample(tag, logits, samplers, histories)
            self.busy_seconds[0] += time.perf_counter() - t0
            self._send((tag, result, self._buffer_bytes(spans)), self.driver_rank, RESULT)

    def _state(self, key: int, max_seq_len: int) -> InferenceState:
        if key not in self._states:
            self._states[key] = self.model.new_state(max_seq_len)
        return self._states[key]

    # -- the seed's one-sequence interface (rank 0, while the others `serve()`) ----------------

    def forward(self, state: InferenceState, token: int, debug: bool = False):
        if not self.is_driver:
            raise TorchlessError("forward runs on rank 0; the other ranks call serve()")
        self.submit("one", [Span(state, [int(token)], state.pos)])
        _, logits = self.collect()
        state.logits[:] = logits[-1]
        state.pos += 1
        return state.logits

    fast_forward = forward


def _sample(tag, logits, samplers, histories):
    if tag[0] == "prefill":
        _, s, last = tag
        pairs = [(s, logits[-1])] if last else []
    else:
        pairs = list(zip(tag[1], logits))
    tokens = []
    for s, row in pairs:
        token = int(samplers[s](row, histories[s]))
        histories[s].append(token)
        tokens.append(token)
    return tokens or None
