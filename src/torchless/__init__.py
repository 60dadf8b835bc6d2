"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch.

The names below are imported on first use (PEP 562), not with the package: `torchless` the
command must fork its supervising process under mpiexec (distributed.supervise_rank) before the
kernels start numba's thread pool, since a forked child cannot use a pool its parent started
(numba's OpenMP layer kills it at the first parallel loop).
"""

from __future__ import annotations

import importlib
import os

# libgomp's spin count when neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY is set. Estimated, not
# measured: at ~140 cycles a `pause` (Intel's figure since Skylake) and ~2 GHz, ~0.7 ms of
# spinning, against ~20 ms for libgomp's default of 300,000.
SPIN_COUNT = 10_000


def _spin_briefly() -> None:
    """After a parallel region numba's OpenMP workers (libgomp: numba's threading layer on Linux
    without TBB) spin, waiting for the next region, before they sleep: 300,000 `pause` loops by
    default (~20 ms by the estimate above). A decode step's regions come microseconds apart, so
    a short spin keeps them warm; but between steps, and all through a prompt's products (BLAS
    on our own threads), the spinning workers held the cores that our other threads (BLAS row
    blocks, batch parts, pipeline stages, the server's) waited for. libgomp reads this once,
    when numba first loads it (its first parallel loop, or numba.set_num_threads), so it is set
    here, on `import torchless`; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


_spin_briefly()

_EXPORTS = {
    ".api": ["LLM"],
    ".config": ["ModelConfig"],
    ".errors": ["ContextOverflowError", "ModelFileError", "TorchlessError", "UnsupportedModelError"],
    ".generate": ["generate_tokens"],
    ".kernels.parallel": [
        # seed 6.1
        "WorkDistributionConfig", "WorkStealingStats", "NumaHint", "num_cpus",
        "matmul_vec_adaptive", "matmul_vec_adaptive_into", "attention_parallel_adaptive",
        # seed 6.2
        "PipelineState", "PipelineConfig",
        # seed 6.3
        "TensorParallelStrategy", "TensorParallelConfig", "column_parallel_linear",
        "row_parallel_linear", "all_reduce_sum", "all_reduce_sum_inplace", "mlp_tensor_parallel"],
    ".llama_compat": ["Llama", "LlamaGrammar", "LlamaRAMCache"],
    ".loader": ["Parameters"],
    ".model.mistral": ["InferenceState", "Mistral"],
    # parallel models
    ".model.parallel": ["ParallelAttention", "ParallelConfig", "ParallelInferenceState", "ParallelLayer",
                        "ParallelMLP", "TensorParallelMistral"],
    ".model.pipeline": ["PipelineParallelMistral"],
    ".sampling": ["Sampler", "SamplingParams", "sample"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'torchless' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
