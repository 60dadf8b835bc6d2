"""Pipeline parallelism bookkeeping (seed 6.2): the stage state machine and the buffer budget.

Both pieces are plain Python; the pipelined model drives real stage workers with them.

`PipelineState` tracks which micro-batch sits in which stage. The reference crate's version
overwrote occupied slots and reused ids; this one refuses misuse with an exception and leaves its
state untouched, so a bug in the caller cannot silently drop or duplicate a micro-batch.

`PipelineConfig` sizes the pipeline from what its in-flight buffers really cost, so a config made
by `for_model` never asks for more buffer memory than its budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class PipelineState:
    """Which micro-batch is in which of `num_stages` stages; at most `max_depth` in flight.

    Micro-batches get ids 0, 1, 2, ... in push order (never reused). A clock tick is: maybe
    `push()` a new one into stage 0, let every stage work on its slot, then `advance()`.
    Micro-batches leave the last stage in push order and wait in a FIFO until `pop()`.
    """

    def __init__(self, num_stages: int, max_depth: int):
        if int(num_stages) != num_stages or num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
        if int(max_depth) != max_depth or max_depth < 1:
            raise ValueError(f"max_depth must be an integer >= 1, got {max_depth!r}")
        self.num_stages = int(num_stages)
        self.max_depth = int(max_depth)
        self.slots: list[int | None] = [None] * self.num_stages
        self._completed: deque[int] = deque()
        self._next_id = 0

    @property
    def in_flight(self) -> int:
        """Micro-batches inside a stage (completed ones waiting for `pop` do not count)."""
        return sum(s is not None for s in self.slots)

    def can_accept(self) -> bool:
        return self.slots[0] is None and self.in_flight < self.max_depth

    def has_output(self) -> bool:
        return bool(self._completed)

    def is_empty(self) -> bool:
        """Nothing in any stage and nothing waiting to be popped."""
        return self.in_flight == 0 and not self._completed

    def push(self) -> int:
        """Put a new micro-batch into stage 0 and return its id."""
        # Check before touching anything: a refused push must leave the state as it was.
        if self.slots[0] is not None:
            raise RuntimeError(f"push: stage 0 is busy with micro-batch {self.slots[0]}")
        if self.in_flight >= self.max_depth:
            raise RuntimeError(f"push: {self.in_flight} micro-batches in flight (max_depth {self.max_depth})")
        mb_id = self._next_id
        self._next_id += 1
        self.slots[0] = mb_id
        return mb_id

    def advance(self) -> None:
        """Move every micro-batch one stage on; the one leaving the last stage is completed."""
        last = self.slots[-1]
        if last is not None:
            self._completed.append(last)
        # Walk from the back so each slot is read before it is overwritten (no id is lost).
        for s in range(self.num_stages - 1, 0, -1):
            self.slots[s] = self.slots[s - 1]
        self.slots[0] = None

    def pop(self) -> int:
        """The oldest completed micro-batch id."""
        if not self._completed:
            raise RuntimeError("pop: no completed micro-batch")
        return self._completed.popleft()

    def schedule(self, n_micro_batches: int) -> list[list[tuple[int, int]]]:
        """Per clock tick, the (stage, micro-batch index) pairs at work, to push `n_micro_batches`.

        Obtained by running a fresh state with the same shape (this one is not touched): push
        whenever possible, record the occupied slots, advance. With max_depth >= num_stages it is
        the classic GPipe fill/drain diagonal, stage s working on micro-batch t - s at tick t,
        over M + S - 1 ticks; a smaller max_depth leaves extra gaps.
        """
        if int(n_micro_batches) != n_micro_batches or n_micro_batches < 0:
            raise ValueError(f"n_micro_batches must be an integer >= 0, got {n_micro_batches!r}")
        sim = PipelineState(self.num_stages, self.max_depth)
        ticks: list[list[tuple[int, int]]] = []
        pushed = done = 0
        while done < n_micro_batches:
            if pushed < n_micro_batches and sim.can_accept():
                sim.push()  # a fresh state numbers from 0, so the id is the micro-batch index
                pushed += 1
            ticks.append([(s, mb) for s, mb in enumerate(sim.slots) if mb is not None])
            sim.advance()
            while sim.has_output():
                sim.pop()
                done += 1
        return ticks

    def __repr__(self) -> str:
        return (f"PipelineState(num_stages={self.num_stages}, max_depth={self.max_depth}, "
                f"slots={self.slots}, completed={list(self._completed)}, next_id={self._next_id})")


def gpipe_schedule(n_stages: int, n_micro_batches: int) -> list[list[tuple[int, int]]]:
    """The classic fill/drain schedule: no depth limit beyond the number of stages."""
    return PipelineState(n_stages, n_stages).schedule(n_micro_batches)


def predicted_bubble(n_stages: int, n_micro_batches: int) -> float:
    """Fraction of stage-ticks left idle by fill/drain: (S - 1) / (M + S - 1).

    M micro-batches over S stages take M + S - 1 ticks, i.e. S * (M + S - 1) stage-ticks, of
    which S * M do work. Assumes equal work per stage and no depth limit below S.
    """
    if n_stages < 1 or n_micro_batches < 1:
        raise ValueError("n_stages and n_micro_batches must be >= 1")
    return (n_stages - 1) / (n_micro_batches + n_stages - 1)


# More micro-batches than stages shrinks the bubble: with M = 2S it is (S-1)/(3S-1) < 1/3.
# Past 64 the gain is a few percent and each one is another set of buffers and more latency.
_MAX_MICRO_BATCHES = 64


@dataclass(frozen=True)
class PipelineConfig:
    num_micro_batches: int = 4
    async_execution: bool = False
    memory_budget: int = 512 * 2**20  # bytes for the buffers in flight between stages

    def __post_init__(self):
        if isinstance(self.num_micro_batches, bool) or int(self.num_micro_batches) != self.num_micro_batches \
                or self.num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be an integer >= 1, got {self.num_micro_batches!r}")
        if not self.memory_budget > 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {self.memory_budget!r}")
        if not isinstance(self.async_execution, bool):
            raise ValueError(f"async_execution must be a bool, got {self.async_execution!r}")

    @classmethod
    def default(cls) -> "PipelineConfig":
        return cls()

    @staticmethod
    def micro_batch_bytes(hidden_size: int, batch_size: int = 1, n_buffers: int = 2,
                          dtype_bytes: int = 4, tokens: int = 1) -> int:
        """Bytes of the buffers one micro-batch holds between stages.

        = n_buffers * batch_size * tokens * hidden_size * dtype_bytes

        The only thing handed from stage to stage is the hidden state: `tokens` rows (1 in decode,
        the chunk length in chunked prefill) of `hidden_size` float32 per sequence. Two buffers
        (double buffering) let stage k write the next one while stage k+1 still reads the last.
        Weights and KV caches are not counted: each stage owns its own and they exist without
        pipelining too.
        """
        for name, v in (("hidden_size", hidden_size), ("batch_size", batch_size),
                        ("n_buffers", n_buffers), ("dtype_bytes", dtype_bytes), ("tokens", tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        return int(n_buffers) * int(batch_size) * int(tokens) * int(hidden_size) * int(dtype_bytes)

    def max_in_flight_bytes(self, hidden_size: int, batch_size: int = 1, tokens: int = 1) -> int:
        """Buffer bytes with all `num_micro_batches` in flight at once."""
        return self.num_micro_batches * self.micro_batch_bytes(hidden_size, batch_size, tokens=tokens)

    @classmethod
    def for_model(cls, n_layers: int, hidden_size: int, memory_budget: int = 512 * 2**20,
                  batch_size: int = 1, tokens: int = 1) -> "PipelineConfig":
        """As many micro-batches as pay off (2 per layer, at most 64) and as the budget holds."""
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers!r}")
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget!r}")
        per = cls.micro_batch_bytes(hidden_size, batch_size, tokens=tokens)
        fit = int(memory_budget // per)
        if fit < 1:
            raise ValueError(f"one micro-batch needs {per} bytes of buffers, over the budget of {memory_budget}")
        return cls(num_micro_batches=min(2 * int(n_layers), _MAX_MICRO_BATCHES, fit),
                   memory_budget=memory_budget)
