"""Tensor parallelism (seed 6.3): how a weight is split over ranks, and the products and
reductions on one rank's shard.

Column-parallel splits a weight's output rows: a rank computes its slice of the output. Row-
parallel splits its input columns: a rank computes a partial sum over its slice of the input,
and an all-reduce adds the partials. Q/K/V and gate/up are column-parallel and the attention
output and down projection row-parallel (Megatron-LM's split), so each block needs one
all-reduce. `TensorParallelMistral` (model/parallel.py) loads only its shards; the functions
here also take a whole weight and slice this rank's part out of it, for tests and for one
process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from ..quant import BLOCK_LAYOUT, QTensor
from . import qmatmul
from .ops import silu


class TensorParallelStrategy(Enum):
    COLUMN_PARALLEL = "column"  # split output features; outputs are concatenated
    ROW_PARALLEL = "row"        # split input features; partial outputs are summed
    NONE = "none"


@dataclass(frozen=True)
class TensorParallelConfig:
    world_size: int = 1
    rank: int = 0
    attention_qkv_strategy: TensorParallelStrategy = TensorParallelStrategy.COLUMN_PARALLEL
    attention_output_strategy: TensorParallelStrategy = TensorParallelStrategy.ROW_PARALLEL
    mlp_gate_up_strategy: TensorParallelStrategy = TensorParallelStrategy.COLUMN_PARALLEL
    mlp_down_strategy: TensorParallelStrategy = TensorParallelStrategy.ROW_PARALLEL

    def __post_init__(self):
        for name in ("world_size", "rank"):
            if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"TensorParallelConfig.{name} must be an int, got {getattr(self, name)!r}")
        if self.world_size < 1:
            raise ValueError(f"TensorParallelConfig: world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"TensorParallelConfig: rank {self.rank} is outside 0..{self.world_size - 1}")

    @classmethod
    def new(cls, world_size: int, rank: int) -> "TensorParallelConfig":
        return cls(world_size, rank)

    @classmethod
    def default(cls) -> "TensorParallelConfig":
        return cls()

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def with_rank(self, rank: int) -> "TensorParallelConfig":
        return replace(self, rank=rank)

    def local_size(self, n: int) -> int:
        """This rank's share of n: sizes differ by at most one and add up to n (the first
        n % world_size ranks take one more)."""
        base, extra = divmod(self._check_n(n), self.world_size)
        return base + (self.rank < extra)

    def local_offset(self, n: int) -> int:
        base, extra = divmod(self._check_n(n), self.world_size)
        return self.rank * base + min(self.rank, extra)

    def local_range(self, n: int) -> tuple[int, int]:
        start = self.local_offset(n)
        return start, start + self.local_size(n)

    def local_range_aligned(self, n: int, align: int) -> tuple[int, int]:
        """The balanced partition of n // align whole units of `align` (quantized blocks)."""
        if align < 1 or self._check_n(n) % align:
            raise ValueError(f"{n} does not split into whole blocks of {align}")
        start, stop = self.local_range(n // align)
        return start * align, stop * align

    def _check_n(self, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot partition a negative size {n}")
        return int(n)


# -- products on this rank's shard ---------------------------------------------------------------

def _block(weights) -> int:
    return BLOCK_LAYOUT[weights.ggml_type][0] if isinstance(weights, QTensor) else 1


def _product(weights, x: np.ndarray, rows=None, cols=None) -> np.ndarray:
    """x @ W[rows, cols].T for x (in,) or (T, in); reads only that part of the weight."""
    x = np.asarray(x, np.float32)
    if isinstance(weights, qmatmul.PackedWeight):
        if cols is not None:
            raise ValueError("a packed weight cannot be split by columns; pass its column shard "
                             "(QTensor.col_slice before packing) with sharded=True")
        r0, r1 = rows or (0, weights.shape[0])
        x2 = np.ascontiguousarray(x.reshape(-1, weights.shape[1]))
        out = np.empty(weights.shape[0], np.float32)
        result = np.empty((x2.shape[0], r1 - r0), np.float32)
        for i, row in enumerate(x2):  # the kernel reads only rows r0..r1 of the weight
            qmatmul.matvec_into(weights, row, out, r0, r1)
            result[i] = out[r0:r1]
        return result.reshape(x.shape[:-1] + (r1 - r0,))
    if isinstance(weights, QTensor):
        if rows is not None:
            weights = weights.row_slice(*rows)
        if cols is not None:
            weights = weights.col_slice(*cols)
        w = weights.dequantize()
    else:
        w = np.asarray(weights, np.float32)
        w = w[slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None)]
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input of {x.shape[-1]} features for a weight shard of shape {w.shape}")
    return x @ w.T


def column_parallel_linear(weights, input: np.ndarray, config: TensorParallelConfig, *,
                           sharded: bool = False, align: int = 1) -> np.ndarray:
    """This rank's slice of the output features of input @ W.T. `weights` (float array,
    QTensor or PackedWeight) is the whole (out, in) matrix, or with sharded=True this rank's
    rows only. `align` keeps the split on multiples of it (to match a row-parallel partner
    whose columns are quantized blocks)."""
    if sharded:
        return _product(weights, input)
    return _product(weights, input, rows=config.local_range_aligned(weights.shape[0], align))


def row_parallel_linear(weights, input: np.ndarray, config: TensorParallelConfig, *,
                        sharded: bool = False, align: int = 1) -> np.ndarray:
    """This rank's partial sum of input @ W.T over its slice of the input features; the sum of
    every rank's partial (all_reduce_sum) is the whole product. `input` is the whole input or
    already this rank's slice; with sharded=True, `weights` holds this rank's columns only."""
    if sharded:
        return _product(weights, input)
    cols = config.local_range_aligned(weights.shape[1], max(align, _block(weights)))
    if input.shape[-1] == weights.shape[1]:
        input = input[..., cols[0]:cols[1]]
    elif input.shape[-1] != cols[1] - cols[0]:
        raise ValueError(f"row-parallel input has {input.shape[-1]} features: expected the whole "
                         f"{weights.shape[1]} or this rank's {cols[1] - cols[0]}")
    return _product(weights, input, cols=cols)


# -- reductions ----------------------------------------------------------------------------------

def all_reduce_sum(partials, group=None) -> np.ndarray:
    """The sum of the ranks' partial results.

    all_reduce_sum(array, group): a real collective; every member's C-contiguous float32
    `array` becomes the sum over the group, in place (shared memory between threads, or
    MPI Allreduce between ranks), and is returned.
    all_reduce_sum([p0, p1, ...]): the seed's list form, for partials held in one process;
    returns a new array."""
    if group is not None:
        return group.all_reduce_sum(partials)
    if isinstance(partials, np.ndarray):
        return partials
    partials = list(partials)
    if not partials:
        raise ValueError("all_reduce_sum of no partials")
    result = np.array(partials[0], dtype=np.float32, copy=True)
    all_reduce_sum_inplace(result, partials[1:])
    return result


def all_reduce_sum_inplace(result: np.ndarray, partials) -> np.ndarray:
    """result += every partial (it adds: result's own value stays in the sum)."""
    for p in partials:
        if np.shape(p) != result.shape:
            raise ValueError(f"partial of shape {np.shape(p)} cannot be added to {result.shape}")
        np.add(result, p, out=result)
    return result


def mlp_tensor_parallel(input: np.ndarray, gate, up, down, tp_config: TensorParallelConfig,
                        group=None, *, sharded: bool = False) -> np.ndarray:
    """SwiGLU down(silu(gate x) * up x), split over the intermediate features: gate/up are
    column-parallel and down row-parallel, so a rank needs no communication until the final
    all-reduce, which makes the result the whole MLP's on every rank.

    With a group, this rank computes its shard and the group reduces. Without one, every
    rank's shard is computed here in turn and the partials summed (one process checking the
    split); that needs the whole weights (sharded=False)."""
    if sharded:
        partial = _mlp_shard(input, gate, up, down, tp_config, sharded=True)
        if tp_config.is_parallel and group is None:
            raise ValueError("mlp_tensor_parallel on sharded weights needs the group to reduce over")
        return partial if group is None else all_reduce_sum(np.ascontiguousarray(partial), group)
    if group is not None:
        return all_reduce_sum(np.ascontiguousarray(_mlp_shard(input, gate, up, down, tp_config)), group)
    return all_reduce_sum([_mlp_shard(input, gate, up, down, tp_config.with_rank(r))
                           for r in range(tp_config.world_size)])


def _mlp_shard(x, gate, up, down, tp, sharded=False):
    align = _block(down)
    g = column_parallel_linear(gate, x, tp, sharded=sharded, align=align)
    u = column_parallel_linear(up, x, tp, sharded=sharded, align=align)
    return row_parallel_linear(down, (silu(g) * u).astype(np.float32), tp, sharded=sharded, align=align)
