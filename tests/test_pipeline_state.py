"""PipelineState (a property test against a simple model), the schedule, and PipelineConfig."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from torchless.kernels.pipeline import (
    PipelineConfig,
    PipelineState,
    gpipe_schedule,
    predicted_bubble,
)


def snapshot(p: PipelineState):
    return (list(p.slots), list(p._completed), p._next_id, p.in_flight)


class PipelineMachine(RuleBasedStateMachine):
    """The model keeps each in-flight id's stage in a dict (not a slot list like the real one)."""

    @initialize(num_stages=st.integers(1, 6), max_depth=st.integers(1, 8))
    def setup(self, num_stages, max_depth):
        self.S, self.D = num_stages, max_depth
        self.p = PipelineState(num_stages, max_depth)
        self.stage_of: dict[int, int] = {}  # id -> stage, for ids inside a stage
        self.completed: list[int] = []      # ids out of the last stage, not popped yet
        self.pushed: list[int] = []
        self.popped: list[int] = []

    def model_can_accept(self):
        return 0 not in self.stage_of.values() and len(self.stage_of) < self.D

    @rule()
    def push(self):
        if self.model_can_accept():
            mb = self.p.push()
            assert not self.pushed or mb > self.pushed[-1]  # strictly increasing, never reused
            assert mb not in self.pushed
            self.pushed.append(mb)
            self.stage_of[mb] = 0
        else:
            before = snapshot(self.p)
            with pytest.raises(RuntimeError):
                self.p.push()
            assert snapshot(self.p) == before

    @rule()
    def advance(self):
        self.p.advance()
        for mb in sorted(self.stage_of):  # oldest first: they leave in push order
            self.stage_of[mb] += 1
            if self.stage_of[mb] == self.S:
                del self.stage_of[mb]
                self.completed.append(mb)

    @rule()
    def pop(self):
        if self.completed:
            mb = self.p.pop()
            assert mb == self.completed.pop(0)
            self.popped.append(mb)
        else:
            before = snapshot(self.p)
            with pytest.raises(RuntimeError):
                self.p.pop()
            assert snapshot(self.p) == before

    @rule()
    def drain(self):
        """After S advances everything pushed is out, in push order, exactly once."""
        for _ in range(self.S):
            self.advance()
        while self.p.has_output():
            self.popped.append(self.p.pop())
        self.completed.clear()
        assert self.p.is_empty()
        assert self.popped == self.pushed

    @invariant()
    def matches_model(self):
        if not hasattr(self, "p"):
            return
        expected = [None] * self.S
        for mb, s in self.stage_of.items():
            expected[s] = mb
        assert self.p.slots == expected
        assert self.p.in_flight == len(self.stage_of)
        assert self.p.can_accept() == self.model_can_accept()
        assert self.p.has_output() == bool(self.completed)
        assert self.p.is_empty() == (not self.stage_of and not self.completed)

    @invariant()
    def safety(self):
        if not hasattr(self, "p"):
            return
        held = [mb for mb in self.p.slots if mb is not None]
        assert len(held) == len(set(held))                   # no id in two slots
        assert held == sorted(held, reverse=True)            # stage 0 holds the newest
        assert self.p.in_flight <= self.D
        # nothing lost or duplicated: every pushed id is in exactly one place
        places = held + list(self.p._completed) + self.popped
        assert sorted(places) == self.pushed
        assert self.popped == self.pushed[: len(self.popped)]  # popped in push order


PipelineMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestPipelineMachine = PipelineMachine.TestCase


# --- PipelineState unit tests ---------------------------------------------------------------

@pytest.mark.parametrize("args", [(0, 1), (1, 0), (-1, 3), (2, -5)])
def test_state_rejects_bad_shape(args):
    with pytest.raises(ValueError):
        PipelineState(*args)


def test_state_walkthrough():
    p = PipelineState(3, 2)
    assert p.is_empty() and p.can_accept() and not p.has_output()
    assert p.push() == 0
    with pytest.raises(RuntimeError):  # stage 0 busy: the reference would overwrite id 0 here
        p.push()
    p.advance()
    assert p.push() == 1
    p.advance()
    assert p.slots == [None, 1, 0]
    assert not p.can_accept()  # slot 0 free but max_depth=2 reached
    with pytest.raises(RuntimeError):
        p.push()
    p.advance()
    assert p.has_output() and p.in_flight == 1 and p.can_accept()
    assert p.push() == 2  # a fresh id, not a recycled 0
    assert p.pop() == 0
    with pytest.raises(RuntimeError):
        p.pop()
    assert "slots=[2, None, 1]" in repr(p)


def test_single_stage():
    p = PipelineState(1, 1)
    ids = []
    for _ in range(5):
        ids.append(p.push())
        p.advance()
        assert p.pop() == ids[-1]
    assert ids == [0, 1, 2, 3, 4] and p.is_empty()


# --- schedule / bubble ----------------------------------------------------------------------

def test_schedule_small_example():
    assert gpipe_schedule(3, 2) == [
        [(0, 0)],
        [(0, 1), (1, 0)],
        [(1, 1), (2, 0)],
        [(2, 1)],
    ]
    assert gpipe_schedule(3, 0) == []


@given(st.integers(1, 8), st.integers(1, 20))
def test_schedule_is_gpipe_diagonal(S, M):
    ticks = gpipe_schedule(S, M)
    assert len(ticks) == M + S - 1
    for t, active in enumerate(ticks):
        assert sorted(active) == [(s, t - s) for s in range(S) if 0 <= t - s < M]
    busy = sum(len(a) for a in ticks)
    assert busy == S * M
    assert 1 - busy / (S * len(ticks)) == pytest.approx(predicted_bubble(S, M))


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 15))
def test_schedule_with_depth_limit(S, D, M):
    ticks = PipelineState(S, D).schedule(M)
    seen: dict[int, list[tuple[int, int]]] = {}
    for t, active in enumerate(ticks):
        assert len(active) <= min(S, D)
        assert len({s for s, _ in active}) == len(active)  # one micro-batch per stage per tick
        for s, mb in active:
            seen.setdefault(mb, []).append((t, s))
    assert sorted(seen) == list(range(M))
    for mb, visits in seen.items():  # each visits stages 0..S-1 on consecutive ticks
        t0 = visits[0][0]
        assert visits == [(t0 + s, s) for s in range(S)]
    if D >= S:
        assert ticks == gpipe_schedule(S, M)


def test_schedule_leaves_state_alone():
    p = PipelineState(2, 2)
    p.push()
    before = snapshot(p)
    p.schedule(5)
    assert snapshot(p) == before


def test_predicted_bubble():
    assert predicted_bubble(1, 7) == 0.0
    assert predicted_bubble(4, 1) == pytest.approx(3 / 4)
    assert predicted_bubble(4, 8) == pytest.approx(3 / 11)
    with pytest.raises(ValueError):
        predicted_bubble(0, 3)
    with pytest.raises(ValueError):
        predicted_bubble(3, 0)


# --- PipelineConfig -------------------------------------------------------------------------

def test_config_defaults_and_validation():
    c = PipelineConfig.default()
    assert c == PipelineConfig(4, False, 512 * 2**20)
    for bad in (dict(num_micro_batches=0), dict(num_micro_batches=-2), dict(memory_budget=0),
                dict(memory_budget=-1), dict(num_micro_batches=2.5)):
        with pytest.raises(ValueError):
            PipelineConfig(**bad)


def test_micro_batch_bytes():
    # hidden 4096 float32, double-buffered: 2 * 4096 * 4
    assert PipelineConfig.micro_batch_bytes(4096) == 32768
    assert PipelineConfig.micro_batch_bytes(4096, batch_size=3, n_buffers=1, dtype_bytes=2) == 3 * 4096 * 2
    assert PipelineConfig.micro_batch_bytes(64, tokens=16) == 2 * 16 * 64 * 4
    with pytest.raises(ValueError):
        PipelineConfig.micro_batch_bytes(0)


def test_for_model_examples():
    c = PipelineConfig.for_model(32, 4096)  # Mistral 7B shape: the layer bound wins
    assert c.num_micro_batches == 64 and c.memory_budget == 512 * 2**20
    assert PipelineConfig.for_model(2, 4096).num_micro_batches == 4
    per = PipelineConfig.micro_batch_bytes(4096)
    tight = PipelineConfig.for_model(32, 4096, memory_budget=3 * per + per // 2)
    assert tight.num_micro_batches == 3  # the budget wins
    assert PipelineConfig.for_model(32, 4096, memory_budget=per).num_micro_batches == 1
    with pytest.raises(ValueError):
        PipelineConfig.for_model(32, 4096, memory_budget=per - 1)
    with pytest.raises(ValueError):
        PipelineConfig.for_model(0, 4096)


@settings(max_examples=300)
@given(n_layers=st.integers(1, 200), hidden=st.integers(1, 16384), batch=st.integers(1, 64),
       tokens=st.integers(1, 512), budget=st.integers(1, 2**32))
def test_for_model_respects_budget(n_layers, hidden, batch, tokens, budget):
    per = PipelineConfig.micro_batch_bytes(hidden, batch, tokens=tokens)
    if per > budget:
        with pytest.raises(ValueError):
            PipelineConfig.for_model(n_layers, hidden, budget, batch_size=batch, tokens=tokens)
        return
    c = PipelineConfig.for_model(n_layers, hidden, budget, batch_size=batch, tokens=tokens)
    assert c.memory_budget == budget
    assert 1 <= c.num_micro_batches <= min(2 * n_layers, 64)
    assert c.max_in_flight_bytes(hidden, batch, tokens=tokens) <= budget
    # and it is not needlessly small: one more would break the budget or the upper bound
    assert c.num_micro_batches == min(2 * n_layers, 64) or (c.num_micro_batches + 1) * per > budget
