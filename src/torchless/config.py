"""ModelConfig: the shape of a Mistral/Llama/Qwen2 decoder, from GGUF metadata or config.json.

Every value is read from a file that may be corrupt or hostile, so each one goes through a typed
field reader (`integer`, `real`, `text`, `flag`) that names the key and the bad value in one line,
instead of `int()` quietly truncating 2.5 or failing on NaN, a string or an array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError, UnsupportedModelError, shown

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# Hugging Face `model_type` / `architectures[0]` -> our architecture name.
_HF_ARCHITECTURES = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
}


# -- typed field readers -------------------------------------------------------------------------

def integer(value, what: str, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum`; bools, floats (2.5 or 64.0), NaN, strings and
    arrays are refused, as llama.cpp refuses a key of the wrong type."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ModelFileError(f"{what} must be an integer, got {shown(value)}")
    if value < minimum:
        raise ModelFileError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def real(value, what: str) -> float:
    """`value` as a finite float (an integer is fine, a bool, string or array is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ModelFileError(f"{what} must be a number, got {shown(value)}")
    if not math.isfinite(value):
        raise ModelFileError(f"{what} must be finite, got {value}")
    return float(value)


def text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ModelFileError(f"{what} must be a string, got {shown(value)}")
    return value


def flag(value, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ModelFileError(f"{what} must be true or false, got {shown(value)}")
    return bool(value)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    sliding_window: int | None = None  # None: full attention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on Q, K and V
    # GGUF `llama` files store Q/K rows permuted so rotary pairs are adjacent (2i, 2i+1);
    # Hugging Face files and GGUF `qwen2` pair dimension i with i + head_dim/2.
    rope_interleaved: bool = False

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {shown(self.architecture)} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "vocab_size", "context_length"):
            integer(getattr(self, name), f"model config: {name}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"model config: {self.n_heads} attention heads cannot be grouped over "
                f"{self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelFileError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None:
            integer(self.sliding_window, "model config: sliding_window")
        # NaN, infinite, zero or negative values would run and produce garbage text.
        if real(self.rope_theta, "model config: rope_theta") <= 0:
            raise ModelFileError(f"model config: rope_theta must be positive, got {self.rope_theta}")
        if real(self.norm_eps, "model config: norm_eps") < 0:
            raise ModelFileError(f"model config: norm_eps must not be negative, got {self.norm_eps}")

    @property
    def kv_cache_len(self) -> int:
        """Entries per layer in the KV cache: a ring of `sliding_window` entries when windowed."""
        if self.sliding_window is not None:
            return min(self.sliding_window, self.context_length)
        return self.context_length

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names=()) -> "ModelConfig":
        arch = metadata.get("general.architecture")
        if arch is None:
            raise ModelFileError("GGUF metadata has no general.architecture")
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {shown(arch)} is not supported; "
                                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def get(key, read, default=None, **limits):
            value = metadata.get(f"{arch}.{key}")
            if value is None:
                if default is None:
                    raise ModelFileError(f"GGUF metadata is missing {arch}.{key}")
                return default
            return read(value, f"GGUF metadata {arch}.{key}", **limits)

        hidden = get("embedding_length", integer)
        n_heads = get("attention.head_count", integer)
        head_dim = get("attention.key_length", integer, hidden // n_heads)
        tokens = metadata.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens) if isinstance(tokens, (list, np.ndarray)) else None
        if f"{arch}.vocab_size" not in metadata and n_tokens is None:
            raise ModelFileError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        scaling = get("rope.scaling.type", text, "none")
        if scaling not in ("none", "linear") or get("rope.scaling.factor", real, 1.0) != 1.0:
            raise UnsupportedModelError(f"RoPE scaling {shown(scaling)} is not supported")
        rope_dims = get("rope.dimension_count", integer, head_dim)
        if rope_dims != head_dim:
            raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
        window = get("attention.sliding_window", integer, 0, minimum=0)
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", integer),
            n_layers=get("block_count", integer),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", integer, n_heads),
            head_dim=head_dim,
            vocab_size=get("vocab_size", integer, n_tokens),
            context_length=get("context_length", integer),
            sliding_window=window or None,
            rope_theta=get("rope.freq_base", real, 10000.0),
            norm_eps=get("attention.layer_norm_rms_epsilon", real, 1e-5),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            rope_interleaved=arch != "qwen2",
        )

    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        if not isinstance(config, dict):
            raise ModelFileError(f"config.json must hold a JSON object, got {shown(config)}")
        names = [config.get("model_type")] + list(_json_list(config.get("architectures")))
        arch = next((_HF_ARCHITECTURES[n] for n in names if isinstance(n, str) and n in _HF_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"config.json model_type {shown(config.get('model_type'))} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        scaling = config.get("rope_scaling") or {}
        if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise UnsupportedModelError(f"config.json: RoPE scaling {shown(scaling)} is not supported")

        def get(key, read, default=None, **limits):
            value = config.get(key)
            if value is None:  # absent, or JSON null
                if default is None:
                    raise ModelFileError(f"config.json is missing {key!r}")
                return default
            return read(value, f"config.json {key}", **limits)

        hidden = get("hidden_size", integer)
        n_heads = get("num_attention_heads", integer)
        window = None
        if arch != "llama" and get("use_sliding_window", flag, True):
            window = get("sliding_window", integer, 0, minimum=0) or None
        rope_parameters = config.get("rope_parameters")  # where transformers >= 5 keeps it
        if config.get("rope_theta") is None and isinstance(rope_parameters, dict):
            config = dict(config, rope_theta=rope_parameters.get("rope_theta"))
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", integer),
            n_layers=get("num_hidden_layers", integer),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", integer, n_heads),
            head_dim=get("head_dim", integer, hidden // n_heads),
            vocab_size=get("vocab_size", integer),
            context_length=get("max_position_embeddings", integer, 2048),
            sliding_window=window,
            rope_theta=get("rope_theta", real, 10000.0),
            norm_eps=get("rms_norm_eps", real, 1e-6),
            tie_embeddings=get("tie_word_embeddings", flag, False),
            attention_bias=arch == "qwen2" or get("attention_bias", flag, False),
            rope_interleaved=False,
        )


def _json_list(value) -> list:
    return value if isinstance(value, list) else []
