"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch."""

from .api import LLM
from .config import ModelConfig
from .errors import ContextOverflowError, ModelFileError, TorchlessError, UnsupportedModelError
from .generate import generate_tokens
from .loader import Parameters
from .model.mistral import InferenceState, Mistral
from .sampling import Sampler, SamplingParams, sample

__all__ = [
    "LLM", "ModelConfig", "Parameters", "Mistral", "InferenceState",
    "SamplingParams", "Sampler", "sample", "generate_tokens",
    "TorchlessError", "ModelFileError", "UnsupportedModelError", "ContextOverflowError",
]
