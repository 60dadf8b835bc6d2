"""Tensor parallelism for real: sharded weights, real all-reduce, on threads and MPI ranks.
The oracle is the single-process model (itself held to transformers elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_factory import make_hf_model, write_gguf
from torchless import Mistral, Parameters, TorchlessError
from torchless.model.parallel import ParallelConfig, TensorParallelMistral
from torchless.model.shards import ThreadedTensorParallel
from torchless.kernels.tensor_parallel import TensorParallelConfig

TOKENS = [5, 17, 101, 3, 250, 42, 42, 7, 199, 64, 12, 0]
SCRIPTS = Path(__file__).parent / "mpi_scripts"


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def single_logits(path, tokens=TOKENS):
    model = Mistral.load(Parameters.load(path))
    state = model.new_state(64)
    return np.stack([model.forward(state, t).copy() for t in tokens])


def sharded_logits(model, tokens=TOKENS):
    state = model.new_state(64)
    prefill = model.prefill(state, tokens[:5], all_logits=True)
    return np.concatenate([prefill, np.stack([model.fast_forward(state, t).copy() for t in tokens[5:]])])


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    return write_gguf(make_hf_model("qwen2", seed=4), tmp_path_factory.mktemp("qwen2") / "q.gguf")


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_threads_equal_single_process(tiny_models, qwen2_gguf, arch, world):
    path = tiny_models["mistral"][2] if arch == "mistral" else qwen2_gguf
    model = ThreadedTensorParallel.load(Parameters.load(path), world)
    try:
        assert_close_rel(sharded_logits(model), single_logits(path))
    finally:
        model.close()


def test_the_strategies_decide_how_each_block_is_split(tiny_models):
    """Attention replicated (none, none), the MLP split (column, row): the same logits, each
    shard holding every head and half the FFN; a split that needs an all-gather is refused."""
    from torchless.kernels.tensor_parallel import TensorParallelStrategy as S

    path = tiny_models["mistral"][2]
    tp = TensorParallelConfig(attention_qkv_strategy=S.NONE, attention_output_strategy=S.NONE)
    model = ThreadedTensorParallel.load(Parameters.load(path), 2, tp)
    try:
        assert_close_rel(sharded_logits(model), single_logits(path))
        config = model.config
        for shard in model.shards:
            assert shard.layout.n_heads == config.n_heads
            assert shard.layers[0].attn_q.shape[0] == config.n_heads * config.head_dim
            assert shard.layers[0].ffn_gate.shape[0] == config.intermediate_size // 2
    finally:
        model.close()
    with pytest.raises(TorchlessError, match="MLP as column then column is not supported"):
        ThreadedTensorParallel.load(Parameters.load(path), 2, TensorParallelConfig(
            mlp_down_strategy=S.COLUMN_PARALLEL))


def test_smollm2_on_two_threads(smollm2_path):
    ids = [504, 3575, 282, 4649, 314, 7042, 30]
    model = ThreadedTensorParallel.load(Parameters.load(smollm2_path), 2)
    try:
        assert_close_rel(sharded_logits(model, ids), single_logits(smollm2_path, ids))
    finally:
        model.close()


def test_each_shard_holds_its_part_of_the_weights(smollm2_path):
    params = Parameters.load(smollm2_path)
    full = Mistral.load(params)
    shards = [TensorParallelMistral.load(params, TensorParallelConfig(2, r), group=_NoGroup(2))
              for r in range(2)]
    total = full.weight_bytes_per_token()
    for shard in shards:
        assert 0.45 * total < shard.weight_bytes_per_token() < 0.55 * total
    # SmolLM2: 9 query heads over 3 KV heads; rank 0 has heads 0-4 (KV 0, 1), rank 1 5-8 (KV 1, 2)
    assert [s.layout.n_heads for s in shards] == [5, 4]
    assert [s.layout.n_kv_heads for s in shards] == [2, 2]
    assert shards[1].layout.kv_map == (0, 1, 1, 1)


class _NoGroup:
    """A stand-in group for inspecting shards without running them."""

    def __init__(self, world_size):
        self.world_size = world_size

    def all_reduce_sum(self, array):
        raise AssertionError("not for running")


def test_world_that_cannot_split_the_model_is_one_clear_error(smollm2_path, tiny_models):
    with pytest.raises(TorchlessError, match="cannot split 9 attention heads"):
        TensorParallelMistral.load(Parameters.load(smollm2_path), TensorParallelConfig(10, 0), _NoGroup(10))
    q8 = tiny_models["llama"][2].parent / "q8.gguf"
    write_gguf(make_hf_model("llama", seed=1), q8, quant="Q8_0")  # head_dim 8, blocks of 32
    with pytest.raises(TorchlessError, match="not a multiple of its 32-value blocks"):
        TensorParallelMistral.load(Parameters.load(q8), TensorParallelConfig(3, 1), _NoGroup(3))


def test_a_failing_shard_ends_the_others_with_its_message(tiny_models):
    model = ThreadedTensorParallel.load(Parameters.load(tiny_models["mistral"][2]), 2)
    state = model.new_state(64)
    model.fast_forward(state, 1)

    def boom(*args):
        raise RuntimeError("injected failure")

    model.shards[1].decode_mlp = boom
    with pytest.raises(TorchlessError, match="rank 1 failed: RuntimeError: injected failure"):
        model.fast_forward(state, 2)
    model.close()


def test_parallel_config_from_string():
    assert ParallelConfig.from_string("tp=2").tensor.world_size == 2
    assert ParallelConfig.from_string("pp=2,mb=4").pipeline_config.num_micro_batches == 4
    for bad in ("tp=0", "tp=x", "xx=2", "tp"):
        with pytest.raises(TorchlessError):
            ParallelConfig.from_string(bad)


# -- MPI: real ranks, real MPI_Allreduce ------------------------------------------------------

def mpiexec(n, *args, timeout=300):
    launcher = shutil.which("mpiexec")
    if launcher is None:
        pytest.fail("mpiexec not found: install the test extra (mpi4py and mpich from PyPI)")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.run([launcher, "-n", str(n), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_ranks_equal_single_process(tiny_models, n):
    r = mpiexec(n, sys.executable, str(SCRIPTS / "tp_model_check.py"), str(tiny_models["mistral"][2]),
                ",".join(map(str, TOKENS)))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_mpi_smollm2_two_ranks(smollm2_path):
    r = mpiexec(2, sys.executable, str(SCRIPTS / "tp_model_check.py"), str(smollm2_path),
                "504,3575,282,4649,314,7042,30")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def assert_mpi_generate_prints_what_one_process_prints(model, ranks, spec,
                                                      prompt="The capital of France is", max_tokens=12):
    args = ["generate", "-m", str(model), "--max-tokens", str(max_tokens), "--temperature", "0", prompt]
    single = subprocess.run([sys.executable, "-m", "torchless", *args], capture_output=True,
                            text=True, timeout=300)
    mpi = mpiexec(ranks, sys.executable, "-m", "torchless", *args, "--parallel", spec)
    assert single.returncode == 0 and mpi.returncode == 0, mpi.stderr
    assert mpi.stdout == single.stdout and single.stdout.strip()
    return mpi


def test_parallel_auto_says_what_it_chose(smollm2_path):
    """In one process: every core on the model. Under 3 ranks, SmolLM2's 9 heads split 3 ways:
    tensor parallelism."""
    one = subprocess.run([sys.executable, "-m", "torchless", "generate", "-m", str(smollm2_path),
                          "--parallel", "auto", "--max-tokens", "2", "hi"], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0 and "parallel: none (one process" in one.stderr, one.stderr
    mpi = assert_mpi_generate_prints_what_one_process_prints(smollm2_path, 3, "auto", max_tokens=6)
    assert "parallel: tp=3 (3 MPI ranks: tensor parallelism" in mpi.stderr


def test_mpi_generate_prints_what_one_process_prints(smollm2_path):
    assert_mpi_generate_prints_what_one_process_prints(smollm2_path, 2, "tp=2")


def test_mpi_world_that_cannot_split_fails_fast(smollm2_path):
    r = mpiexec(2, sys.executable, "-m", "torchless", "generate", "-m", str(smollm2_path),
                "--parallel", "tp=3", "hello", timeout=120)
    assert r.returncode != 0
    assert "needs 3 MPI ranks" in r.stderr and "Traceback" not in r.stderr


def test_threads_generate_prints_what_one_process_prints(smollm2_path):
    args = [sys.executable, "-m", "torchless", "generate", "-m", str(smollm2_path),
            "--max-tokens", "12", "--temperature", "0", "The capital of France is"]
    single = subprocess.run(args, capture_output=True, text=True, timeout=300)
    threads = subprocess.run(args + ["--parallel", "tp=2"], capture_output=True, text=True, timeout=300)
    assert threads.returncode == 0, threads.stderr
    assert threads.stdout == single.stdout and single.stdout.strip()


def test_mpi_rank_that_dies_ends_the_job_naming_it(tiny_models):
    import time

    start = time.monotonic()
    r = mpiexec(2, sys.executable, str(SCRIPTS / "tp_fault.py"), str(tiny_models["mistral"][2]), timeout=120)
    assert r.returncode != 0
    assert "rank 1 failed" in r.stderr and "injected failure" in r.stderr, r.stderr
    assert time.monotonic() - start < 60


def test_parallel_layers_run_the_models_own_steps(tiny_models):
    """ParallelLayer / ParallelAttention / ParallelMLP drive the model's decode steps over a
    ParallelInferenceState; a token through them equals fast_forward (and the sharded MLP's
    forward_tensor_parallel equals it too)."""
    from torchless.model.parallel import ParallelInferenceState, ParallelLayer

    model = Mistral.load(Parameters.load(tiny_models["mistral"][2]))
    ref_state = model.new_state(32)
    expected = [model.fast_forward(ref_state, t).copy() for t in TOKENS[:4]]
    pstate = ParallelInferenceState(model.config, states=[model.new_state(32)])
    layers = [ParallelLayer(model, i) for i in range(len(model.layers))]
    for t, want in zip(TOKENS[:4], expected):
        state = pstate.as_inference_state()
        model.embed_into(t, state.x)
        for layer in layers:
            layer.attention.forward_adaptive(pstate)
            layer.mlp.forward_tensor_parallel(pstate, TensorParallelConfig())
        state.cache.advance(state.pos + 1)
        assert_close_rel(model.decode_logits(state), want, rel=1e-5)
    assert pstate.pos == 4


def test_parallel_configs_work_distribution_reaches_the_decode_steps(tiny_models):
    from torchless import WorkDistributionConfig
    from torchless.engine import make_runner

    path = tiny_models["mistral"][2]
    work = WorkDistributionConfig(min_chunk_size=32, max_chunk_size=32, tasks_per_thread=1)
    model = make_runner(Parameters.load(path), ParallelConfig(work=work)).model
    assert model.work is work
    plain = Mistral.load(Parameters.load(path))
    a, b = model.new_state(16), plain.new_state(16)
    for t in TOKENS[:4]:
        assert_close_rel(model.fast_forward(a, t), plain.fast_forward(b, t), rel=1e-6)
