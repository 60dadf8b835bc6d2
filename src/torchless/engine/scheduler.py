"""The scheduler: which sequences run, and which of their tokens go into the next micro-batch
(nano-vllm's scheduler.py).

Sequences wait until admitted: at most `max_batch` run at once, and their KV caches together
must fit `kv_budget_bytes` (each counted at its full size, prompt plus budget, so an admitted
sequence can never run out of room). A micro-batch takes, from running sequences not already
in flight, each one's next tokens: the one token sampled last for a sequence that is decoding,
a chunk of the prompt for one still prefilling. All of them share a budget of `chunk_size`
tokens a micro-batch, so a long prompt goes in chunks, interleaved with the others' decode
steps, instead of stalling them. Sequences finishing leave at once and free their caches.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..errors import TorchlessError
from .sequence import Sequence


class Scheduler:
    def __init__(self, max_batch: int = 8, chunk_size: int = 256,
                 kv_budget_bytes: int | None = None, cache_bytes: Callable[[int], int] = lambda n: 0):
        if max_batch < 1 or chunk_size < 1:
            raise TorchlessError(f"max_batch and chunk_size must be at least 1, got {max_batch} "
                                 f"and {chunk_size}")
        self.max_batch, self.chunk_size = max_batch, chunk_size
        self.kv_budget_bytes, self.cache_bytes = kv_budget_bytes, cache_bytes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_bytes = 0  # of the running sequences' caches, at full size

    def add(self, seq: Sequence) -> None:
        need = self.cache_bytes(seq.max_len)
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise TorchlessError(f"a sequence of {seq.max_len} tokens needs {need} bytes of KV "
                                 f"cache, over the budget of {self.kv_budget_bytes}")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, new_state: Callable[[int], object]) -> list[Sequence]:
        """Move waiting sequences in while there is room; give each its cache."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq.finished:  # cancelled while waiting
                self.waiting.popleft()
                continue
            need = self.cache_bytes(seq.max_len)
            if self.kv_budget_bytes is not None and self.kv_bytes + need > self.kv_budget_bytes:
                break  # first come, first served: nobody overtakes it
            seq.state = new_state(seq.max_len)
            self.waiting.popleft()
            self.kv_bytes += need
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def next_micro_batch(self, max_seqs: int) -> list[tuple[Sequence, list[int], int]]:
        """(sequence, tokens, start position) for up to `max_seqs` sequences with tokens not yet
        sent: the running ones in admission order, so decode steps go before new prompts."""
        batch, budget = [], self.chunk_size
        for seq in self.running:
            if len(batch) == max_seqs or budget == 0:
                break
            if seq.finished or seq.unscheduled == 0:
                continue
            tokens, start = seq.next_span(budget)
            budget -= len(tokens)
            batch.append((seq, tokens, start))
        return batch

    def put_back(self, batch) -> None:
        """A micro-batch the runner had no room for: its sequences go in a later one."""
        for seq, tokens, start in reversed(batch):
            seq.in_flight -= 1
            seq.n_scheduled = start

    def finish(self, seq: Sequence) -> object | None:
        """Drop a finished sequence; returns its state for the runner to release."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_bytes -= self.cache_bytes(seq.max_len)
            state, seq.state = seq.state, None
            return state
        return None
