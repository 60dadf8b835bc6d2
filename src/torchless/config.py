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


# -- RoPE scaling ----------------------------------------------------------------------------------

ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched past the context a model was trained on: the rope
    types of transformers' `modeling_rope_utils.py`, whose formulas `inverse_frequencies` follows.

    linear: every frequency divided by `factor`.
    llama3: frequencies whose wavelength is longer than original_context / low_freq_factor are
            divided by `factor`, those shorter than original_context / high_freq_factor kept, and
            those between blended smoothly.
    yarn:   a ramp per pair, from the original frequency (pairs that turn more than beta_fast
            times in original_context tokens) to the frequency / factor (fewer than beta_slow
            times); cos and sin are multiplied by `attention_factor`.
    freq_factors: GGUF's `rope_freqs.weight` (what llama.cpp's converter writes for llama3): each
            frequency divided by its factor, before `kind` applies (as llama.cpp does).
    """
    kind: str = "none"               # "none" or one of ROPE_SCALING_TYPES
    factor: float = 1.0
    original_context: int = 0        # llama3, yarn: the context length of pretraining
    low_freq_factor: float = 1.0     # llama3
    high_freq_factor: float = 4.0    # llama3
    beta_fast: float = 32.0          # yarn
    beta_slow: float = 1.0           # yarn
    truncate: bool = True            # yarn: the ramp's ends rounded outwards to whole pairs
    attention_factor: float = 1.0    # yarn: multiplies cos and sin
    freq_factors: tuple = ()         # (head_dim // 2,) from GGUF rope_freqs.weight, or empty

    def __post_init__(self):
        # What the frequencies are divided by must leave them finite (a factor of 1e-320 would not).
        for name in ("factor", "attention_factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            value = real(getattr(self, name), f"RoPE scaling {name}")
            if not (value > 0 and math.isfinite(1 / value)):
                raise ModelFileError(f"RoPE scaling {name} must be a positive normal number, got {value}")

    def inverse_frequencies(self, head_dim: int, theta: float) -> np.ndarray:
        """(head_dim // 2,) float64: the angle per position of each rotary pair."""
        inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.freq_factors:
            inv_freq = inv_freq / np.asarray(self.freq_factors, dtype=np.float64)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            context, low, high = self.original_context, self.low_freq_factor, self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > context / low, inv_freq / self.factor, inv_freq)
            with np.errstate(divide="ignore", invalid="ignore"):  # used only where it is medium
                smooth = (context / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= context / high) & (wavelen <= context / low)
            return np.where(medium, smoothed, scaled)
        if self.kind == "yarn":
            def pair_turning(rotations):  # the (fractional) pair that turns `rotations` times
                return head_dim * math.log(self.original_context / (rotations * 2 * math.pi)) \
                    / (2 * math.log(theta))
            low, high = pair_turning(self.beta_fast), pair_turning(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, head_dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
            return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)
        return inv_freq


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _positive(value: float, what: str) -> float:
    if not (value > 0 and math.isfinite(1 / value)):
        raise ModelFileError(f"{what} must be positive, got {value}")
    return value


def rope_scaling_from_hf(config: dict) -> RopeScaling:
    """config.json's `rope_scaling` (transformers < 5) or `rope_parameters` (>= 5), read as
    transformers reads it; a rope type other than default, linear, llama3 and yarn is refused."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UnsupportedModelError(f"config.json: RoPE scaling {shown(rope)} is not supported")
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial is not None and real(partial, "config.json partial_rotary_factor") != 1.0:
        raise UnsupportedModelError(f"config.json: partial RoPE (partial_rotary_factor {partial}) "
                                    "is not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModelError(f"config.json: RoPE scaling type {shown(kind)} is not supported; "
                                    f"supported: default, {', '.join(ROPE_SCALING_TYPES)}")

    def get(key, read, default=None, **limits):
        value = rope.get(key)
        if value is None:
            if default is None:
                raise ModelFileError(f"config.json: {kind} RoPE scaling is missing {key!r}")
            return default
        return read(value, f"config.json rope {key}", **limits)

    def positive(key, default=None):
        return _positive(get(key, real, default), f"config.json rope {key}")

    if kind == "linear":
        return RopeScaling("linear", positive("factor"))
    # transformers: a top-level original_max_position_embeddings (Phi-3's place) wins, then the
    # rope dict's, then max_position_embeddings.
    context = config.get("original_max_position_embeddings")
    context = integer(context, "config.json original_max_position_embeddings") if context is not None \
        else get("original_max_position_embeddings", integer, 0) or \
        integer(config.get("max_position_embeddings", 2048), "config.json max_position_embeddings")
    if kind == "llama3":
        return RopeScaling("llama3", positive("factor"), context, low_freq_factor=positive("low_freq_factor"),
                           high_freq_factor=positive("high_freq_factor"))
    # yarn
    if rope.get("factor") is None:  # transformers: the ratio of the two context lengths
        factor = integer(config.get("max_position_embeddings", 2048), "config.json max_position_embeddings") / context
    else:
        factor = positive("factor")
    attention = rope.get("attention_factor")
    if attention is not None:
        attention = positive("attention_factor")
    else:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek's form; truthiness as transformers tests it
            attention = _yarn_mscale(factor, get("mscale", real)) / _yarn_mscale(factor, get("mscale_all_dim", real))
        else:
            attention = _yarn_mscale(factor)
    # transformers: `get("beta_fast") or 32`, so 0 means the default too
    beta_fast = positive("beta_fast", 32.0) if rope.get("beta_fast") else 32.0
    beta_slow = positive("beta_slow", 1.0) if rope.get("beta_slow") else 1.0
    return RopeScaling("yarn", factor, context, beta_fast=beta_fast, beta_slow=beta_slow,
                       truncate=get("truncate", flag, True), attention_factor=attention)


def rope_scaling_from_gguf(get, context_length: int, n_pairs: int, rope_freqs=None) -> RopeScaling:
    """GGUF's `rope.scaling.*` keys (read with from_gguf's `get`) and the `rope_freqs.weight`
    values, as llama.cpp reads them: "none" ignores the factor, a factor of 0 means 1, YaRN's
    original context defaults to the context length and its magnitude to 0.1 ln(factor) + 1
    (rope.scaling.yarn_attn_factor, where llama.cpp's converter puts transformers'
    attention_factor, replaces it)."""
    freq_factors = ()
    if rope_freqs is not None:
        values = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
        with np.errstate(all="ignore"):
            bad = values.size != n_pairs or not (values > 0).all() or not np.isfinite(1 / values).all()
        if bad:
            raise ModelFileError(f"tensor rope_freqs.weight must hold {n_pairs} positive finite "
                                 f"factors, got {values.size} values")
        freq_factors = tuple(values.tolist())
    kind = get("rope.scaling.type", text, "linear")
    factor = get("rope.scaling.factor", real, 0.0) or 1.0
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling(freq_factors=freq_factors)
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"RoPE scaling type {shown(kind)} is not supported; "
                                    "supported: none, linear, yarn (and llama3's rope_freqs)")
    _positive(factor, "GGUF metadata rope.scaling.factor")
    if kind == "linear":
        return RopeScaling("linear", factor, freq_factors=freq_factors)
    ext = get("rope.scaling.yarn_ext_factor", real, 1.0)
    if ext != 1.0:
        raise UnsupportedModelError(f"YaRN with rope.scaling.yarn_ext_factor {ext} is not supported")
    attention = get("rope.scaling.yarn_attn_factor", real, 0.0) or _yarn_mscale(factor)
    attention *= get("rope.scaling.attn_factor", real, 1.0)
    return RopeScaling(
        "yarn", factor, get("rope.scaling.original_context_length", integer, context_length),
        beta_fast=_positive(get("rope.scaling.yarn_beta_fast", real, 32.0), "GGUF metadata yarn_beta_fast"),
        beta_slow=_positive(get("rope.scaling.yarn_beta_slow", real, 1.0), "GGUF metadata yarn_beta_slow"),
        attention_factor=_positive(attention, "GGUF metadata YaRN attention factor"),
        freq_factors=freq_factors)


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
    rope_scaling: RopeScaling = RopeScaling()

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
        if self.rope_scaling.kind == "yarn" and self.rope_theta == 1.0:  # its ramp divides by log(theta)
            raise ModelFileError("model config: YaRN RoPE scaling needs rope_theta other than 1")

    @property
    def rope_inv_freq(self) -> np.ndarray:
        """(head_dim // 2,) float64: the angle per position of each rotary pair, scaled."""
        return self.rope_scaling.inverse_frequencies(self.head_dim, self.rope_theta)

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's magnitude correction; 1 otherwise)."""
        return self.rope_scaling.attention_factor

    @property
    def kv_cache_len(self) -> int:
        """Entries per layer in the KV cache: a ring of `sliding_window` entries when windowed."""
        if self.sliding_window is not None:
            return min(self.sliding_window, self.context_length)
        return self.context_length

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names=(), rope_freqs=None) -> "ModelConfig":
        """rope_freqs: the values of the file's `rope_freqs.weight` tensor, when it has one (a
        caller that only lists the file may leave them out: the config then lacks them)."""
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
        if get("attention.value_length", integer, head_dim) != head_dim:
            raise UnsupportedModelError(
                f"attention.value_length {metadata[f'{arch}.attention.value_length']} different from "
                f"attention.key_length {head_dim} is not supported")
        rope_dims = get("rope.dimension_count", integer, head_dim)
        if rope_dims != head_dim:
            raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
        context = get("context_length", integer)
        scaling = rope_scaling_from_gguf(get, context, head_dim // 2, rope_freqs)
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
            context_length=context,
            sliding_window=window or None,
            rope_theta=get("rope.freq_base", real, 10000.0),
            norm_eps=get("attention.layer_norm_rms_epsilon", real, 1e-5),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            rope_interleaved=arch != "qwen2",
            rope_scaling=scaling,
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
        scaling = rope_scaling_from_hf(config)

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
            rope_scaling=scaling,
        )


def _json_list(value) -> list:
    return value if isinstance(value, list) else []
