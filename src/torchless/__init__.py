"""torchless: LLM inference for Mistral- and Llama-family models on CPUs, without PyTorch."""

from .config import ModelConfig
from .errors import ContextOverflowError, ModelFileError, TorchlessError, UnsupportedModelError
from .loader import Parameters
from .model.mistral import InferenceState, Mistral

__all__ = [
    "ModelConfig", "Parameters", "Mistral", "InferenceState",
    "TorchlessError", "ModelFileError", "UnsupportedModelError", "ContextOverflowError",
]
