"""Tensor parallelism over MPI ranks, as a runner: rank 0 drives, every rank computes.

Each rank holds a TensorParallelMistral shard (1/world of every weight) and a KV cache of its
own heads for every sequence. Rank 0 runs the engine; for each micro-batch it broadcasts what to
run (per span: a key naming the sequence, its tokens, its start and its length limit, plus the
keys of sequences that are done), then all ranks run it together, meeting in the all-reduces of
the row-parallel linears. After the vocabulary-parallel head every rank has the whole logits;
rank 0 keeps them. Between calls the other ranks wait in `follow()`.

A failure that is not the same on every rank (anything but a sequence that does not fit) would
leave the others waiting in a collective, so it ends the job, naming the rank.
"""

from __future__ import annotations

import itertools
from collections import deque

from ..errors import ContextOverflowError
from .mistral import InferenceState, Span
from .parallel import TensorParallelMistral
from .runner import Runner

STEP, END, CLOSE = "step", "end", "close"


class RankStates:
    """The KV caches of one rank, by sequence key: rank 0 names each state it makes, the other
    ranks make theirs when a key first arrives, and all drop a key when rank 0 says so."""

    def __init__(self, model):
        self.model, self._keys, self._by_key = model, itertools.count(), {}
        self.done: list[int] = []  # rank 0: keys to drop, sent with the next message

    def new(self, max_seq_len: int) -> InferenceState:
        state = self.model.new_state(max_seq_len)
        state.key = next(self._keys)
        return state

    def describe(self, spans: list[Span]) -> list[tuple]:
        return [(sp.state.key, sp.tokens, sp.start, sp.state.max_seq_len) for sp in spans]

    def spans(self, meta) -> list[Span]:
        out = []
        for key, tokens, start, max_seq_len in meta:
            if key not in self._by_key:
                self._by_key[key] = self.model.new_state(max_seq_len)
            out.append(Span(self._by_key[key], tokens, start))
        return out

    def take_done(self) -> list[int]:
        done, self.done = self.done, []
        return done

    def drop(self, keys) -> None:
        for key in keys:
            self._by_key.pop(key, None)


class MPITensorParallel(Runner):
    def __init__(self, model: TensorParallelMistral, group):
        self.model, self.config, self.group = model, model.config, group
        self.is_driver = group.rank == 0
        self.states = RankStates(model)
        self._done = deque()

    @classmethod
    def load(cls, params, tp_config, group) -> "MPITensorParallel":
        return cls(TensorParallelMistral.load(params, tp_config, group), group)

    def new_state(self, max_seq_len: int):
        return self.states.new(max_seq_len)

    def release(self, state) -> None:
        self.states.done.append(state.key)

    def cache_bytes(self, n_tokens: int) -> int:
        return super().cache_bytes(n_tokens) // self.group.world_size

    def submit(self, tag, spans: list[Span]) -> None:
        message = (STEP, self.states.describe(spans), self.states.take_done())
        self.group.broadcast_object(message, root=0)
        self._done.append((tag, self._run(message)))

    def collect(self):
        return self._done.popleft()

    def _run(self, message):
        _, meta, done = message
        self.states.drop(done)
        spans = self.states.spans(meta)
        try:
            for sp in spans:  # the same answer on every rank: this micro-batch fails alone
                sp.state.cache.check_fits(sp.start + len(sp.tokens))
        except ContextOverflowError as e:
            return e
        try:
            return self.model.forward_spans(spans)
        except Exception as e:  # noqa: BLE001 - the other ranks may be in a collective: end the job
            self.group.abort(f"{type(e).__name__}: {e}")

    def end_call(self) -> None:
        self.group.broadcast_object((END, [], self.states.take_done()), root=0)

    def follow(self) -> bool:
        while True:
            message = self.group.broadcast_object(None, root=0)
            if message[0] == STEP:
                self._run(message)
                continue
            self.states.drop(message[2])
            return message[0] == END

    def close(self) -> None:
        """Release the ranks waiting in `follow()` for good (rank 0, once)."""
        if self.is_driver and not getattr(self, "_closed", False):
            self._closed = True
            self.group.broadcast_object((CLOSE, [], []), root=0)
