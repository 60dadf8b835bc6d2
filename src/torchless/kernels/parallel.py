"""Seed 6: the parallelization primitives, under the names the seed gives them.

Work distribution (6.1) is `workdist` (configuration, statistics, NUMA) and `adaptive` (the
scheduler and its kernels); pipeline parallelism (6.2) is `pipeline`; tensor parallelism (6.3)
is `tensor_parallel`. This module gathers them, as the seed's `kernels/parallel.rs` does.
"""

from .adaptive import GLOBAL_STATS, attention_parallel_adaptive, matmul_vec_adaptive, matmul_vec_adaptive_into
from .pipeline import PipelineConfig, PipelineState
from .tensor_parallel import (TensorParallelConfig, TensorParallelStrategy, all_reduce_sum,
                              all_reduce_sum_inplace, column_parallel_linear, mlp_tensor_parallel,
                              row_parallel_linear)
from .workdist import NumaHint, WorkDistributionConfig, WorkStealingStats, num_cpus

__all__ = [
    "WorkDistributionConfig", "WorkStealingStats", "NumaHint", "num_cpus", "GLOBAL_STATS",
    "matmul_vec_adaptive", "matmul_vec_adaptive_into", "attention_parallel_adaptive",
    "PipelineState", "PipelineConfig",
    "TensorParallelStrategy", "TensorParallelConfig", "column_parallel_linear",
    "row_parallel_linear", "all_reduce_sum", "all_reduce_sum_inplace", "mlp_tensor_parallel",
]
