"""ModelConfig: the shape of a Mistral/Llama/Qwen2 decoder, from GGUF metadata or config.json."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelFileError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# Hugging Face `model_type` / `architectures[0]` -> our architecture name.
_HF_ARCHITECTURES = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
}


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
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "vocab_size", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFileError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"model config: {self.n_heads} attention heads cannot be grouped over "
                f"{self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelFileError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelFileError(f"model config: sliding_window must be positive, got {self.sliding_window}")

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
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def get(key, default=None, required=True):
            value = metadata.get(f"{arch}.{key}", default)
            if value is None and required:
                raise ModelFileError(f"GGUF metadata is missing {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv_heads = int(get("attention.head_count_kv", n_heads))
        head_dim = int(get("attention.key_length", None, required=False) or hidden // n_heads)
        vocab = get("vocab_size", None, required=False)
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelFileError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)
        window = get("attention.sliding_window", None, required=False)
        scaling = get("rope.scaling.type", "none", required=False)
        if scaling not in ("none", "linear") or float(get("rope.scaling.factor", 1.0, required=False)) != 1.0:
            raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported")
        rope_dims = int(get("rope.dimension_count", head_dim, required=False))
        if rope_dims != head_dim:
            raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=int(vocab),
            context_length=int(get("context_length")),
            sliding_window=int(window) if window else None,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            rope_interleaved=arch != "qwen2",
        )

    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        names = [config.get("model_type")] + list(config.get("architectures") or [])
        arch = next((_HF_ARCHITECTURES[n] for n in names if n in _HF_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"config.json model_type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise UnsupportedModelError(f"config.json: RoPE scaling {scaling} is not supported")
        try:
            hidden = int(config["hidden_size"])
            n_heads = int(config["num_attention_heads"])
            window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
            if arch == "llama":
                window = None
            return cls(
                architecture=arch,
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or hidden // n_heads),
                vocab_size=int(config["vocab_size"]),
                context_length=int(config.get("max_position_embeddings", 2048)),
                sliding_window=int(window) if window else None,
                rope_theta=float(config.get("rope_theta")
                                 or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
                rope_interleaved=False,
            )
        except KeyError as e:
            raise ModelFileError(f"config.json is missing {e.args[0]!r}") from None
