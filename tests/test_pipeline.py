"""Batched generation and the pipeline (seed 6.2). The oracle is each sequence run alone through
the single-sequence path (itself held to transformers elsewhere)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from torchless import LLM, Mistral, Parameters, TorchlessError
from torchless.engine import Engine, Sequence
from torchless.model.runner import LocalRunner
from torchless.kernels.pipeline import PipelineConfig
from torchless.model.mistral import Span
from torchless.model.pipeline import PipelineParallelMistral, stage_bounds
from torchless.sampling import Sampler, SamplingParams

from test_tensor_parallel import SCRIPTS, assert_mpi_generate_prints_what_one_process_prints, mpiexec

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The sky is blue because",
           "1, 2, 3, 4,", "My favourite food is", "Water boils at", "Hello"]


def run_engine(runner, prompts, max_tokens, max_batch=64):
    """Greedy tokens of each prompt, all through one engine on `runner`."""
    engine = Engine(runner, max_batch=max_batch)
    seqs = [engine.add(Sequence(p, Sampler(SamplingParams(temperature=0)), max_tokens)) for p in prompts]
    while engine.has_work():
        for event in engine.step():
            assert event.finish_reason != "error", event.error
    return [s.tokens[len(s.prompt_ids):] for s in seqs]


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return LLM(str(smollm2_path))


@pytest.fixture(scope="module")
def alone(smollm2):
    return [smollm2(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in PROMPTS]


def test_batched_greedy_text_equals_each_prompt_alone(smollm2, alone):
    out = smollm2(PROMPTS, max_tokens=12, temperature=0)
    assert [c["index"] for c in out["choices"]] == list(range(len(PROMPTS)))
    assert [c["text"] for c in out["choices"]] == alone
    assert out["usage"]["completion_tokens"] == 12 * len(PROMPTS)


def test_pipelined_batch_on_threads_equals_each_prompt_alone(smollm2_path, alone):
    llm = LLM(str(smollm2_path), parallel="pp=2,mb=4")
    try:
        out = llm(PROMPTS, max_tokens=12, temperature=0)
        assert [c["text"] for c in out["choices"]] == alone
        assert all(b > 0 for b in llm.runner.busy_seconds)  # both stages did work
        # one sequence through the pipeline (the seed's forward / fast_forward) agrees too
        assert llm(PROMPTS[0], max_tokens=12, temperature=0)["choices"][0]["text"] == alone[0]
    finally:
        llm.close()


def test_each_sequence_has_its_own_stop(smollm2, alone):
    out = smollm2(PROMPTS[:3], max_tokens=12, temperature=0, stop=["\n"])
    for choice, text in zip(out["choices"], alone):
        assert choice["text"] == text.split("\n")[0]
        assert choice["finish_reason"] == ("stop" if "\n" in text else "length")


def test_streamed_batch_chunks_add_up_to_the_batch(smollm2, alone):
    texts = [""] * 3
    for chunk in smollm2(PROMPTS[:3], max_tokens=12, temperature=0, stream=True):
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert texts == alone[:3]


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_batched_logits_equal_each_sequence_alone(tiny_models, arch):
    """Sequences of different lengths (past the sliding window of 7 for mistral) decode as one
    micro-batch; each one's logits equal its own run's at every step."""
    model = Mistral.load(Parameters.load(tiny_models[arch][2]))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 11, 6, 1)]
    steps = 5
    nexts = rng.integers(0, model.config.vocab_size, (steps, len(prompts)))
    alone = []
    for i, p in enumerate(prompts):
        state = model.new_state(64)
        rows = [model.prefill(state, p).copy()]
        rows += [model.fast_forward(state, int(t)).copy() for t in nexts[:, i]]
        alone.append(rows)
    states = [model.new_state(64) for _ in prompts]
    got = [[model.forward_spans([Span(s, p, 0)])[0]] for s, p in zip(states, prompts)]
    for step in range(steps):
        logits = model.forward_spans([Span(s, [int(nexts[step, i])], s.pos) for i, s in enumerate(states)])
        for i in range(len(prompts)):
            got[i].append(logits[i])
    for g, a in zip(got, alone):
        assert_close_rel(np.stack(g), np.stack(a))


def test_pipeline_prefill_in_chunks_equals_one_process(tiny_models):
    params = Parameters.load(tiny_models["mistral"][2])
    model = Mistral.load(params)
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, 40).tolist()
    ref = model.prefill(model.new_state(64), tokens).copy()
    with pytest.raises(TorchlessError, match="3 stages cannot split 2 layers"):
        PipelineParallelMistral(model, 3)
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=2))
    try:
        state = pipe.new_state(64)
        # stage threads write this cache at once: it is sized in full before any of them runs
        assert state.cache.k.shape[1] == state.cache.cache_len > 0
        assert_close_rel(pipe.prefill(state, tokens, chunk_size=8), ref)
        assert state.pos == 40
    finally:
        pipe.close()
    # a budget of two 8-token chunks: the prefill keeps two in flight, never five
    two_chunks = 2 * PipelineConfig.micro_batch_bytes(model.config.hidden_size, tokens=8)
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=2, memory_budget=two_chunks))
    try:
        assert_close_rel(pipe.prefill(pipe.new_state(64), tokens, chunk_size=8), ref)
        assert pipe.peak_in_flight_bytes == two_chunks
    finally:
        pipe.close()


@pytest.mark.parametrize("async_execution", [False, True])
def test_both_pipeline_modes_give_each_sequence_its_own_tokens(tiny_models, async_execution):
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 7, 1, 5, 2)]
    alone = run_engine(LocalRunner(model), prompts, 6)
    config = PipelineConfig(num_micro_batches=3, async_execution=async_execution)
    pipe = PipelineParallelMistral(model, 2, config)
    try:
        assert run_engine(pipe, prompts, 6) == alone
    finally:
        pipe.close()


def test_pipeline_micro_batches_keep_four_rows_while_every_stage_has_one(tiny_models):
    """num_micro_batches is the most in flight: the engine cuts the running sequences into that
    many only while each keeps MIN_ROWS (4) rows, or fewer rows where it takes that to give
    every stage a micro-batch."""
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=4, async_execution=True))
    rows = {running: pipe.micro_batch_rows(running) for running in (1, 2, 3, 4, 5, 8, 9, 16, 32)}
    assert rows == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 8: 4, 9: 4, 16: 4, 32: 8}
    sizes = []
    real_submit = pipe.submit

    def submit(tag, spans):
        sizes.append(len(spans))
        real_submit(tag, spans)

    pipe.submit = submit
    try:
        prompts = [[1 + i] for i in range(8)]
        assert run_engine(pipe, prompts, 5) == run_engine(LocalRunner(model), prompts, 5)
        assert set(sizes) == {4} and pipe.most_in_flight == 2
        assert pipe.bubble(1.0)["micro_batches"] == 2
    finally:
        pipe.close()


def test_the_lockstep_pipeline_runs_the_pipeline_states_schedule(tiny_models):
    """Without async_execution each tick is the seed's clock: the stages work exactly on the
    slots of PipelineState, the GPipe fill/drain diagonal."""
    from torchless import PipelineState

    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=4))
    try:
        for i in range(4):
            pipe.submit(i, [Span(pipe.new_state(8), [i + 1], 0)])
        assert [pipe.collect()[0] for _ in range(4)] == [0, 1, 2, 3]
        assert pipe.ticks == PipelineState(2, 4).schedule(4)
        assert pipe.ticks[1] == [(0, 1), (1, 0)]  # stage 1 on micro-batch 0 while stage 0 on 1
    finally:
        pipe.close()


def test_pipeline_stays_within_its_memory_budget(tiny_models):
    model = Mistral.load(Parameters.load(tiny_models["mistral"][2]))
    one_token = PipelineConfig.micro_batch_bytes(model.config.hidden_size)
    budget = 3 * one_token  # room for 3 micro-batches of one sequence's token at a time
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=8, memory_budget=budget))
    try:
        out = run_engine(pipe, [[1 + i] for i in range(8)], 6)
        assert sum(map(len, out)) == 48
        assert 0 < pipe.peak_in_flight_bytes <= budget
        with pytest.raises(TorchlessError, match="over the pipeline's memory budget"):
            pipe.submit("big", [Span(pipe.new_state(64), [1, 2, 3, 4], 0)])
    finally:
        pipe.close()


def test_a_failing_stage_ends_the_batch_with_its_name(tiny_models):
    model = Mistral.load(Parameters.load(tiny_models["mistral"][2]))
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=2))
    real = model.run_layers

    def failing(spans, x, start, stop, fast=False):
        if start > 0 and any(sp.start >= 3 for sp in spans):
            raise RuntimeError("injected failure")
        return real(spans, x, start, stop, fast)

    model.run_layers = failing
    try:
        with pytest.raises(AssertionError, match=r"pipeline stage 1 \(layers .*\) failed: RuntimeError: injected failure"):
            run_engine(pipe, [[1, 2], [3, 4, 5], [6]], 8)
        with pytest.raises(TorchlessError, match="pipeline is stopped"):
            pipe.forward(pipe.new_state(64), 1)
    finally:
        pipe.close()


@given(costs=st.lists(st.integers(1, 100), min_size=1, max_size=40), stages=st.integers(1, 8),
       tail=st.integers(0, 500))
def test_stage_bounds_cover_every_layer_once(costs, stages, tail):
    if stages > len(costs):
        with pytest.raises(TorchlessError, match="cannot split"):
            stage_bounds(costs, stages, tail)
        return
    bounds = stage_bounds(costs, stages, tail)
    assert len(bounds) == stages and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(stages - 1))


def test_lm_head_weight_moves_layers_to_the_first_stage():
    assert stage_bounds([1] * 30, 2, 8) == [(0, 19), (19, 30)]
    assert stage_bounds([1] * 30, 3) == [(0, 10), (10, 20), (20, 30)]


def test_local_runner_keeps_submission_order(tiny_models):
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    runner = LocalRunner(model)
    for i in range(3):
        runner.submit(i, [Span(runner.new_state(16), [i + 1], 0)])
    assert [runner.collect()[0] for _ in range(3)] == [0, 1, 2]
    runner.submit("too long", [Span(runner.new_state(2), [1, 2, 3], 0)])
    tag, error = runner.collect()  # a failing micro-batch comes back as its exception
    assert tag == "too long" and isinstance(error, TorchlessError)


def test_pipelined_batch_of_a_random_mistral_equals_each_alone(tiny_models):
    """Greedy tokens of 8 prompts (some past the sliding window) through 2 stage threads."""
    model = Mistral.load(Parameters.load(tiny_models["mistral"][2]))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (2, 9, 4, 1, 12, 3, 5, 8)]

    def texts(runner):
        return run_engine(runner, prompts, 10)

    alone = texts(LocalRunner(model))
    one_by_one = []
    for p in prompts:  # the single-sequence decode path (fast_forward), as the oracle
        state, seq = model.new_state(64), []
        logits = model.prefill(state, p)
        for _ in range(10):
            seq.append(int(np.argmax(logits)))
            logits = model.fast_forward(state, seq[-1])
        one_by_one.append(seq)
    assert alone == one_by_one
    pipe = PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=4))
    try:
        assert texts(pipe) == one_by_one
    finally:
        pipe.close()


# -- MPI: one stage per rank ------------------------------------------------------------------

def assert_batch_equals_each_prompt_alone(model, ranks, spec, max_tokens, prompts):
    r = mpiexec(ranks, sys.executable, str(SCRIPTS / "pp_batch_check.py"), str(model), str(max_tokens),
                spec, *prompts)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_mpi_pipeline_batch_equals_each_prompt_alone(smollm2_path):
    assert_batch_equals_each_prompt_alone(smollm2_path, 2, "pp=2,mb=4", 10, PROMPTS)


def test_mpi_pipeline_three_stages(smollm2_path):
    assert_batch_equals_each_prompt_alone(smollm2_path, 3, "pp=3,mb=4", 6, PROMPTS[:5])


def test_mpi_tensor_parallel_batch_equals_each_prompt_alone(smollm2_path):
    assert_batch_equals_each_prompt_alone(smollm2_path, 2, "tp=2", 8, PROMPTS[:4])


def test_mpi_pipeline_generate_prints_what_one_process_prints(smollm2_path):
    assert_mpi_generate_prints_what_one_process_prints(smollm2_path, 2, "pp=2,mb=2")


def test_mpi_pipeline_with_the_wrong_rank_count_is_one_error(tiny_llama_gguf):
    r = mpiexec(2, sys.executable, "-m", "torchless", "generate", "-m", str(tiny_llama_gguf),
                "--parallel", "pp=3", "hello", timeout=120)
    assert r.returncode != 0 and "needs 3 MPI ranks" in r.stderr and "Traceback" not in r.stderr


def test_mpi_stage_that_fails_ends_the_job_naming_it(tiny_llama_gguf):
    start = time.monotonic()
    r = mpiexec(2, sys.executable, str(SCRIPTS / "pp_fault.py"), str(tiny_llama_gguf), timeout=120)
    assert r.returncode != 0
    assert "rank 1 failed" in r.stderr and "injected failure" in r.stderr, r.stderr
    assert time.monotonic() - start < 60


def test_mpi_tensor_and_pipeline_together_print_what_one_process_prints(smollm2_path):
    """tp=2,pp=2 on 4 ranks: each stage is two tensor-parallel shards."""
    assert_mpi_generate_prints_what_one_process_prints(smollm2_path, 4, "tp=2,pp=2",
                                                      prompt="Once upon a time", max_tokens=10)


def test_seed_load_takes_a_parallel_config(tiny_models):
    from torchless import ParallelConfig, PipelineParallelMistral as Exported

    pipe = Exported.load(Parameters.load(tiny_models["llama"][2]), ParallelConfig.pipeline(3))
    try:
        assert len(pipe.stages) == 2 and pipe.n_micro_batches == 3
        state = pipe.new_state(16)
        ref = Mistral.load(Parameters.load(tiny_models["llama"][2]))
        ref_state = ref.new_state(16)
        for t in (1, 5, 9):  # the seed's one-sequence forward through the stages
            assert_close_rel(pipe.forward(state, t), ref.forward(ref_state, t))
    finally:
        pipe.close()
