"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch.

The names below are imported on first use (PEP 562), not with the package: `torchless` the
command must fork its supervising process under mpiexec (distributed.supervise_rank) before the
kernels start numba's thread pool, since a forked child cannot use a pool its parent started
(numba's OpenMP layer kills it at the first parallel loop).
"""

from __future__ import annotations

import importlib

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
    ".llama_compat": ["Llama", "LlamaGrammar"],
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
