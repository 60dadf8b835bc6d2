"""The engine (engine/): scheduling, chunked prefill, memory budget, failures, cancellation.
The oracle for tokens is each sequence run alone through `generate_tokens` (the one-sequence
loop over `Mistral.prefill` / `fast_forward`, held to transformers elsewhere)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from torchless import LLM, Mistral, Parameters
from torchless.engine import Engine, Sequence
from torchless.generate import generate_tokens
from torchless.model.kv_cache import KVCache
from torchless.model.runner import LocalRunner
from torchless.sampling import Sampler, SamplingParams


def greedy():
    return Sampler(SamplingParams(temperature=0))


@pytest.fixture(scope="module")
def model(tiny_models):
    return Mistral.load(Parameters.load(tiny_models["mistral"][2]))  # sliding window 7


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(7)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (30, 2, 5, 1, 13)]


def alone(model, prompt, n):
    return list(generate_tokens(model, model.new_state(64), prompt, greedy(), n))


class SpyRunner(LocalRunner):
    """A local runner that records each micro-batch's spans and the states alive."""

    def __init__(self, model, fail_on_token=None):
        super().__init__(model)
        self.batches, self.live, self.peak_live, self.fail_on_token = [], 0, 0, fail_on_token

    def new_state(self, max_seq_len):
        self.live += 1
        self.peak_live = max(self.peak_live, self.live)
        return super().new_state(max_seq_len)

    def release(self, state):
        self.live -= 1

    def submit(self, tag, spans):
        self.batches.append([(sp.start, len(sp.tokens)) for sp in spans])
        if self.fail_on_token is not None and any(self.fail_on_token in sp.tokens for sp in spans):
            self._done.append((tag, RuntimeError("injected failure")))
            return
        super().submit(tag, spans)


def run(engine, seqs):
    events = []
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        events += engine.step()
    return events


def test_chunked_prefill_runs_beside_the_others_decode_and_equals_each_alone(model, prompts):
    runner = SpyRunner(model)
    engine = Engine(runner, max_batch=8, chunk_size=8)
    seqs = [Sequence(p, greedy(), 6) for p in prompts]
    run(engine, seqs)
    assert [s.tokens[len(s.prompt_ids):] for s in seqs] == [alone(model, p, 6) for p in prompts]
    assert all(sum(n for _, n in batch) <= 8 for batch in runner.batches)  # the token budget
    # the 30-token prompt went in chunks while the short ones were already decoding
    mixed = [b for b in runner.batches if any(n > 1 for _, n in b) and any(n == 1 and s > 0 for s, n in b)]
    assert mixed, runner.batches
    assert runner.live == 0  # every cache released


def test_the_kv_budget_bounds_the_sequences_running_at_once(model, prompts):
    runner = SpyRunner(model)
    two = 2 * runner.cache_bytes(64)
    engine = Engine(runner, max_batch=8, kv_budget_bytes=two)
    seqs = [Sequence(p[:20], greedy(), 64 - len(p[:20])) for p in prompts]  # 64 positions each
    run(engine, seqs)
    assert runner.peak_live == 2 and all(s.finish_reason == "length" for s in seqs)
    with pytest.raises(Exception, match="over the budget"):
        Engine(runner, kv_budget_bytes=1).add(Sequence([1, 2], greedy(), 1))


def test_a_failing_micro_batch_fails_its_sequences_and_the_rest_go_on(model, prompts):
    poison = prompts[2][0]
    runner = SpyRunner(model, fail_on_token=poison)
    engine = Engine(runner, max_batch=1)  # one at a time: the failure touches only its sequence
    seqs = [Sequence(p, greedy(), 4) for p in prompts]
    events = run(engine, seqs)
    errors = [e for e in events if e.finish_reason == "error"]
    assert [e.seq for e in errors] == [seqs[2]] and "injected failure" in errors[0].error
    for s, p in zip(seqs, prompts):
        if s is not seqs[2]:
            assert s.tokens[len(p):] == alone(model, p, 4)
    assert runner.live == 0


def test_a_sequence_whose_sampling_fails_ends_alone_with_its_error(model, prompts):
    # Logits with nothing to draw (NaN, or all -inf) raise in the sampler; that sequence gets an
    # error event and the others in its micro-batch go on.
    class Spoiled(Sampler):
        def __call__(self, logits, history=(), n_prompt=0):
            return super().__call__(np.full_like(logits, np.nan), history, n_prompt)

    runner = SpyRunner(model)
    engine = Engine(runner)
    spoiled = Spoiled(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    seqs = [Sequence(p, greedy(), 4) for p in prompts[:2]] + [Sequence(prompts[2], spoiled, 4)]
    events = run(engine, seqs)
    errors = [e for e in events if e.finish_reason == "error"]
    assert [e.seq for e in errors] == [seqs[2]] and "NaN or all -inf" in errors[0].error
    for s, p in zip(seqs[:2], prompts):
        assert s.tokens[len(p):] == alone(model, p, 4)
    assert runner.live == 0


def test_a_cancelled_sequence_leaves_at_the_next_step(model, prompts):
    runner = SpyRunner(model)
    engine = Engine(runner)
    keep, drop = Sequence(prompts[1], greedy(), 20), Sequence(prompts[2], greedy(), 20)
    engine.add(keep), engine.add(drop)
    engine.step()
    engine.cancel(drop)
    while engine.has_work():
        engine.step()
    assert drop.finish_reason == "cancelled" and drop.completion_tokens == 1
    assert keep.tokens[len(prompts[1]):] == alone(model, prompts[1], 20) and runner.live == 0


def test_a_huge_context_costs_only_what_is_used(model):
    """A model claiming a 2^31 context: the cache grows as positions are written."""
    config = dataclasses.replace(model.config, context_length=2 ** 31)
    huge = Mistral(config, model.embedding, model.layers, model.output_norm, model.output)
    cache = KVCache(config.n_layers, config.n_kv_heads, config.head_dim, 2 ** 31)
    assert cache.k.nbytes == 0
    state = huge.new_state()
    tokens = list(generate_tokens(huge, state, [1, 2, 3], greedy(), 5))
    assert tokens == alone(model, [1, 2, 3], 5)
    assert state.cache.k.shape[1] <= KVCache.INITIAL_SLOTS


def test_threaded_tensor_parallel_batch_equals_each_prompt_alone(tiny_llama_gguf):
    prompts = ["Hello", "Once upon a time", "1, 2, 3,"]
    single = LLM(str(tiny_llama_gguf))
    expected = [single(p, max_tokens=8, temperature=0)["choices"][0]["text"] for p in prompts]
    sharded = LLM(str(tiny_llama_gguf), parallel="tp=2")
    try:
        out = sharded(prompts, max_tokens=8, temperature=0)
        assert [c["text"] for c in out["choices"]] == expected
    finally:
        sharded.close()


def test_a_decode_step_runs_in_parts_a_thread_each_and_equals_the_whole(tiny_llama_gguf, prompts, monkeypatch):
    """Quantized weights: the batched products give each row the same bits whatever rows share
    its micro-batch (parts of 5 rows or more, as the whole, take the same kernels), so the parts'
    logits equal the whole's exactly."""
    import threading

    import numba

    from torchless.kernels.adaptive import GLOBAL_STATS
    from torchless.model.mistral import Span

    model = Mistral.load(Parameters.load(tiny_llama_gguf))
    ten = (prompts * 2)[:10]
    states = [model.new_state(64) for _ in ten]
    for state, prompt in zip(states, ten):
        model.prefill(state, prompt)
    spans = [Span(state, [3 + i], len(prompt)) for i, (state, prompt) in enumerate(zip(states, ten))]
    numba.set_num_threads(1)
    whole = model.forward_spans(spans)

    calls = []
    forward = model.forward_spans
    # parts are for products too small to cut into tasks (see BatchSplit.forward)
    monkeypatch.setattr("torchless.model.batch_split.inline_threshold_bytes", lambda: 2**62)
    monkeypatch.setattr(model, "forward_spans",
                        lambda part: calls.append((threading.get_ident(), len(part))) or forward(part))
    runner = LocalRunner(model)
    numba.set_num_threads(2)
    try:
        before = GLOBAL_STATS.tasks_created, GLOBAL_STATS.local_tasks
        runner.submit("step", spans)
        tag, logits = runner.collect()
        after = GLOBAL_STATS.tasks_created, GLOBAL_STATS.local_tasks
        assert numba.get_num_threads() == 2  # restored on this thread
    finally:
        runner.close()
    assert tag == "step" and sorted(n for _, n in calls) == [5, 5]
    assert len({thread for thread, _ in calls}) == 2
    assert after[0] - before[0] == 2 and after[1] - before[1] == 2  # the parts, no product tasks
    np.testing.assert_array_equal(logits, whole)  # a row does not depend on its neighbours

    # products big enough to be cut into tasks: the micro-batch runs whole, its products split
    monkeypatch.setattr("torchless.model.batch_split.inline_threshold_bytes", lambda: 0)
    calls.clear()
    runner = LocalRunner(model)
    try:
        runner.submit("step", spans)
        _, logits = runner.collect()
    finally:
        runner.close()
    assert [n for _, n in calls] == [10]
    np.testing.assert_array_equal(logits, whole)


def test_parts_are_balanced_by_tokens_or_the_micro_batch_runs_whole():
    from types import SimpleNamespace

    from torchless.model.batch_split import assign_parts

    def spans(*lengths, states=None):
        states = states or [object() for _ in lengths]
        return [SimpleNamespace(tokens=[0] * n, state=s) for n, s in zip(lengths, states)]

    # parts keep 5 tokens or more (MIN_ROWS_PER_PART), the whole's range of batched kernels:
    # parts of 4 would take the direct kernels, a whole of 8 the expanded float tiles
    assert assign_parts(spans(*[1] * 9), 2) == [list(range(9))]  # a part would hold 4 tokens
    assert assign_parts(spans(5, 1, 1, 1), 2) == [[0, 1, 2, 3]]
    assert assign_parts(spans(*[1] * 10), 2) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert assign_parts(spans(*[1] * 10), 2, products_split=True) == [list(range(10))]
    assert assign_parts(spans(6, *[1] * 5), 2) == [[0], [1, 2, 3, 4, 5]]
    assert assign_parts(spans(40, *[1] * 8), 2) == [list(range(9))]  # 40 of 48 tokens in one part
    assert assign_parts(spans(*[11] * 8), 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert assign_parts(spans(*[200] * 12), 2) == [list(range(12))]  # parts of 1200 tokens: BLAS
    assert assign_parts(spans(1, 1, 1, 1), 1) == [[0, 1, 2, 3]]
    assert assign_parts(spans(*[1] * 19), 4) == [list(range(19))[k::3] for k in range(3)]  # 3 parts
    assert assign_parts(spans(*[1] * 20), 4) == [list(range(k, 20, 4)) for k in range(4)]
    same = object()
    assert assign_parts(spans(4, 1, 1, 1, states=[same, same, object(), object()]), 2) == [[0, 1, 2, 3]]


def test_the_servers_engine_thread_runs_with_its_creators_thread_count(model, prompts):
    """numba's thread count is per thread and a new thread starts with all the cores: `serve
    --threads 1` ran its engine on every core until the engine thread took its creator's."""
    import threading

    import numba

    from torchless.server.engine import EngineThread, Request

    seen, done = [], threading.Event()

    class ThreadCountRunner(LocalRunner):
        def submit(self, tag, spans):
            seen.append(numba.get_num_threads())
            super().submit(tag, spans)

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        server_engine = EngineThread(Engine(ThreadCountRunner(model)))
    finally:
        numba.set_num_threads(before)
    try:
        server_engine.submit(Request(Sequence(prompts[1], greedy(), 3),
                                     lambda text, reason, entries=(): reason and done.set()))
        assert done.wait(60)
    finally:
        server_engine.close()
    assert seen and set(seen) == {1}
