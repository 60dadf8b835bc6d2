"""Seed 6.3's primitives: the partition, the shard products and the reductions. The oracle is
NumPy's product of the whole matrices (and gguf-py's dequantization for quantized shards)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quantize
from hypothesis import given, strategies as st

from torchless.distributed import run_in_threads
from torchless.kernels import qmatmul
from torchless.kernels.ops import silu
from torchless.kernels.tensor_parallel import (TensorParallelConfig, TensorParallelStrategy,
                                                all_reduce_sum, all_reduce_sum_inplace,
                                                column_parallel_linear, mlp_tensor_parallel,
                                                row_parallel_linear)
from torchless.quant import QTensor

rng = np.random.default_rng(7)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@given(n=st.integers(0, 10_000), world=st.integers(1, 64))
def test_partition_is_balanced_and_covers_everything_once(n, world):
    ranges = [TensorParallelConfig(world, r).local_range(n) for r in range(world)]
    sizes = [b - a for a, b in ranges]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world - 1))


@given(blocks=st.integers(0, 500), world=st.integers(1, 16), align=st.sampled_from([1, 32, 256]))
def test_aligned_partition_cuts_on_block_boundaries(blocks, world, align):
    ranges = [TensorParallelConfig(world, r).local_range_aligned(blocks * align, align) for r in range(world)]
    assert all(a % align == 0 and b % align == 0 for a, b in ranges)
    assert ranges[-1][1] == blocks * align


@pytest.mark.parametrize("args", [(0, 0), (2, 2), (2, -1), (-1, 0), (2.0, 0), (True, 0)])
def test_invalid_configs_raise(args):
    with pytest.raises(ValueError):
        TensorParallelConfig(*args)


def test_unaligned_split_raises():
    with pytest.raises(ValueError, match="whole blocks of 32"):
        TensorParallelConfig(2, 0).local_range_aligned(100, 32)


def test_seed_defaults():
    c = TensorParallelConfig.default()
    assert (c.world_size, c.rank, c.is_parallel) == (1, 0, False)
    assert TensorParallelConfig.new(4, 3).local_offset(10) == 8
    assert c.attention_qkv_strategy is TensorParallelStrategy.COLUMN_PARALLEL
    assert c.mlp_down_strategy is TensorParallelStrategy.ROW_PARALLEL


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_column_parallel_concatenates_to_the_whole_product(world):
    w, x = rand(37, 24), rand(3, 24)
    parts = [column_parallel_linear(w, x, TensorParallelConfig(world, r)) for r in range(world)]
    np.testing.assert_allclose(np.concatenate(parts, axis=-1), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_parallel_partials_sum_to_the_whole_product(world):
    w, x = rand(19, 48), rand(48)
    tps = [TensorParallelConfig(world, r) for r in range(world)]
    partials = [row_parallel_linear(w, x, tp) for tp in tps]
    np.testing.assert_allclose(all_reduce_sum(partials), w @ x, rtol=1e-4, atol=1e-4)
    # the input may also be this rank's slice already
    a, b = tps[-1].local_range(48)
    np.testing.assert_array_equal(row_parallel_linear(w, x[a:b], tps[-1]), partials[-1])


def test_quantized_shards_read_only_their_blocks_and_match_gguf():
    w = rand(64, 128)
    raw = quantize(w, GGMLQuantizationType.Q8_0)
    q = QTensor(8, w.shape, raw.reshape(-1).view(np.uint8))
    dense = q.dequantize()
    x = rand(128)
    for world in (2, 4):
        tps = [TensorParallelConfig(world, r) for r in range(world)]
        col = np.concatenate([column_parallel_linear(qmatmul.prepare(q), x, tp) for tp in tps])
        np.testing.assert_allclose(col, dense @ x, rtol=1e-4, atol=1e-3)
        row = all_reduce_sum([row_parallel_linear(q, x, tp) for tp in tps])
        np.testing.assert_allclose(row, dense @ x, rtol=1e-4, atol=1e-3)
    # 4 blocks over 3 ranks: 2 + 1 + 1 blocks, never a block cut in two
    assert [row_parallel_linear(q, x, TensorParallelConfig(3, r)).shape for r in range(3)] == [(64,)] * 3
    assert [TensorParallelConfig(3, r).local_range_aligned(128, 32) for r in range(3)] == [(0, 64), (64, 96), (96, 128)]


def test_inplace_adds_into_its_target():
    target = np.ones(4, np.float32)
    all_reduce_sum_inplace(target, [np.full(4, 2, np.float32), np.full(4, 3, np.float32)])
    np.testing.assert_array_equal(target, np.full(4, 6, np.float32))
    with pytest.raises(ValueError):
        all_reduce_sum_inplace(target, [np.ones(3, np.float32)])


def mlp_reference(x, g, u, d):
    return d @ (silu(g @ x) * (u @ x))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mlp_in_one_process_equals_the_whole_mlp(world):
    x, g, u, d = rand(32), rand(80, 32), rand(80, 32), rand(32, 80)
    np.testing.assert_allclose(mlp_tensor_parallel(x, g, u, d, TensorParallelConfig(world, 0)),
                               mlp_reference(x, g, u, d), rtol=1e-4, atol=1e-4)


def test_mlp_over_a_real_thread_group_gives_every_rank_the_whole_result():
    x, g, u, d = rand(32), rand(80, 32), rand(80, 32), rand(32, 80)
    world = 3

    def rank_body(group):
        tp = TensorParallelConfig(world, group.rank)
        a, b = tp.local_range(80)  # each rank is handed only its shards
        return mlp_tensor_parallel(x, g[a:b], u[a:b], d[:, a:b], tp, group, sharded=True)

    results = run_in_threads(world, rank_body, timeout=30)
    for r in results:
        np.testing.assert_allclose(r, mlp_reference(x, g, u, d), rtol=1e-4, atol=1e-4)


def test_sharded_mlp_without_a_group_refuses():
    with pytest.raises(ValueError, match="needs the group"):
        mlp_tensor_parallel(rand(8), rand(4, 8), rand(4, 8), rand(8, 4), TensorParallelConfig(2, 0),
                            sharded=True)
