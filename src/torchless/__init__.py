"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch."""

from .api import LLM
from .config import ModelConfig
from .errors import ContextOverflowError, ModelFileError, TorchlessError, UnsupportedModelError
from .generate import generate_tokens
from .kernels.parallel import (NumaHint, PipelineConfig, PipelineState, TensorParallelConfig,
                               TensorParallelStrategy, WorkDistributionConfig, WorkStealingStats,
                               all_reduce_sum, all_reduce_sum_inplace, attention_parallel_adaptive,
                               column_parallel_linear, matmul_vec_adaptive, matmul_vec_adaptive_into,
                               mlp_tensor_parallel, num_cpus, row_parallel_linear)
from .llama_compat import Llama, LlamaGrammar
from .loader import Parameters
from .model.mistral import InferenceState, Mistral
from .model.parallel import (ParallelAttention, ParallelConfig, ParallelInferenceState, ParallelLayer,
                             ParallelMLP, TensorParallelMistral)
from .model.pipeline import PipelineParallelMistral
from .sampling import Sampler, SamplingParams, sample

__all__ = [
    "LLM", "Llama", "LlamaGrammar", "ModelConfig", "Parameters", "Mistral", "InferenceState",
    "SamplingParams", "Sampler", "sample", "generate_tokens",
    "TorchlessError", "ModelFileError", "UnsupportedModelError", "ContextOverflowError",
    # seed 6.1
    "WorkDistributionConfig", "WorkStealingStats", "NumaHint", "num_cpus",
    "matmul_vec_adaptive", "matmul_vec_adaptive_into", "attention_parallel_adaptive",
    # seed 6.2
    "PipelineState", "PipelineConfig",
    # seed 6.3
    "TensorParallelStrategy", "TensorParallelConfig", "column_parallel_linear",
    "row_parallel_linear", "all_reduce_sum", "all_reduce_sum_inplace", "mlp_tensor_parallel",
    # parallel models
    "ParallelConfig", "ParallelInferenceState", "ParallelAttention", "ParallelMLP",
    "ParallelLayer", "TensorParallelMistral", "PipelineParallelMistral",
]
