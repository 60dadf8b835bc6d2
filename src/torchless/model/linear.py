"""Linear layers: one weight matrix as stored in the file, and its tensor-parallel forms.

The parallel forms reduce themselves (nano-vllm's RowParallelLinear, gpt-fast's tp.py): a
row-parallel linear holds this rank's columns of the weight and all-reduces its partial
products over its group; a vocabulary-parallel head holds this rank's rows of the output
projection and gathers the logits. So the decoder in mistral.py calls a linear and never learns
whether, or over what, it is sharded.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from ..kernels import fused, gemm, qmatmul
from ..kernels.adaptive import _get_num_threads, _matmul, _matvec
from ..quant import QTensor


class Linear:
    """One weight matrix (out_features, in_features) as stored in the file, and an optional bias."""

    def __init__(self, weight: QTensor, bias: np.ndarray | QTensor | None = None):
        self.weight = weight
        self.bias = bias.dequantize() if isinstance(bias, QTensor) else bias

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @cached_property
    def dense(self) -> np.ndarray:
        # (out, in) float32; only the reference path pays for this copy.
        return np.ascontiguousarray(self.weight.dequantize(), dtype=np.float32)

    @cached_property
    def packed(self) -> qmatmul.PackedWeight:
        # The layout the quantized kernels read; made once, at load.
        return qmatmul.prepare(self.weight)

    def __call__(self, x: np.ndarray, fast: bool = False, work=None) -> np.ndarray:
        """x: (T, in) -> (T, out). fast: the quantized kernels, cut into tasks by `work` (a
        WorkDistributionConfig; None: the adaptive choice), or BLAS for prompt chunks over
        gemm.MIN_TOKENS_FOR_BLAS tokens."""
        if fast:
            x = np.ascontiguousarray(x, np.float32)
            y = np.empty((x.shape[0], self.shape[0]), np.float32)
            if x.shape[0] >= gemm.MIN_TOKENS_FOR_BLAS:
                gemm.matmul_blas_into(self.packed, x, y, _get_num_threads())
            elif x.shape[0] == 1:  # the decode kernel
                _matvec(self.packed, x[0], y[0], work)
            else:  # a micro-batch: each weight tile read once for all its rows
                _matmul(self.packed, x, y, work)
        else:
            y = x @ self.dense.T
        return y if self.bias is None else y + self.bias

    def matvec_into(self, x: np.ndarray, out: np.ndarray, work=None) -> np.ndarray:
        """out = W @ x (+ bias) for one token, cut into tasks by `work` (a
        WorkDistributionConfig; None: the adaptive choice for this shape)."""
        _matvec(self.packed, x, out, work)
        if self.bias is not None:
            fused.add_bias(out, self.bias)
        return out

    def rows(self, start: int, stop: int) -> "Linear":
        """Output features start..stop: a view of the mapped weight, nothing read yet."""
        return Linear(self.weight.row_slice(start, stop),
                      None if self.bias is None else self.bias[start:stop])


class RowParallelLinear(Linear):
    """This rank's input columns of a weight; its products are partial sums, all-reduced over
    `group` so that every rank ends with the whole product."""

    def __init__(self, full: Linear, start: int, stop: int, group):
        if full.bias is not None:  # every rank would add it: the sum would hold it world times
            raise ValueError("a row-parallel linear cannot have a bias")
        super().__init__(full.weight.col_slice(start, stop))
        self.group = group

    def __call__(self, x: np.ndarray, fast: bool = False, work=None) -> np.ndarray:
        return self.group.all_reduce_sum(np.ascontiguousarray(super().__call__(x, fast, work)))

    def matvec_into(self, x: np.ndarray, out: np.ndarray, work=None) -> np.ndarray:
        super().matvec_into(x, out, work)
        return self.group.all_reduce_sum(out)


class VocabParallelLinear(Linear):
    """This rank's slice of the output projection's vocabulary rows. The slices are disjoint,
    so an all-reduce of zero-padded slices is their concatenation: whole logits on every rank."""

    def __init__(self, full: Linear, start: int, stop: int, group):
        super().__init__(full.weight.row_slice(start, stop))
        self.vocab_size, self.start, self.stop, self.group = full.shape[0], start, stop, group

    def __call__(self, x: np.ndarray, fast: bool = False, work=None) -> np.ndarray:
        logits = np.zeros((len(x), self.vocab_size), np.float32)
        logits[:, self.start:self.stop] = super().__call__(x, fast, work)
        return self.group.all_reduce_sum(logits)

    def matvec_into(self, x: np.ndarray, out: np.ndarray, work=None) -> np.ndarray:
        out[:] = 0.0
        super().matvec_into(x, out[self.start:self.stop], work)
        return self.group.all_reduce_sum(out)
