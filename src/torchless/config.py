"""ModelConfig: the shape of a Llama-family decoder (Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma 3), from
GGUF metadata or config.json.

Every value is read from a file that may be corrupt or hostile, so each one goes through a typed
field reader (`integer`, `real`, `text`, `flag`) that names the key and the bad value in one line,
instead of `int()` quietly truncating 2.5 or failing on NaN, a string or an array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError, UnsupportedModelError, shown
from .moe_config import moe_from_gguf, moe_from_hf, refuse_unsupported_moe

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma3")

# Hugging Face `model_type` / `architectures[0]` -> our architecture name.
_HF_ARCHITECTURES = {
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "mistral", "MistralForCausalLM": "mistral",
    "mixtral": "mixtral", "MixtralForCausalLM": "mixtral",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3", "Qwen3ForCausalLM": "qwen3",
    "gemma3_text": "gemma3", "Gemma3ForCausalLM": "gemma3",
    "gemma3": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",  # its text_config
}

# transformers' defaults for keys a config.json may leave out, where they differ from ours
# (Gemma 3's are Gemma3TextConfig's: a multimodal config's text_config often names few keys).
_HF_DEFAULTS = {
    "qwen3": dict(head_dim=128),
    "gemma3": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
                   rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                   tie_word_embeddings=True),
}
GEMMA3_GLOBAL_THETA, GEMMA3_LOCAL_THETA, GEMMA3_PATTERN = 1_000_000.0, 10_000.0, 6
# transformers' hidden_act names -> ours: the gated MLP's activation
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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
    # Per-layer attention (Gemma 3, Qwen with max_window_layers): which layers slide, when only
    # some do (None: every layer, if sliding_window is set); local layers may have their own
    # RoPE base, unscaled (None: the same rotary as global layers).
    sliding_layers: tuple | None = None  # (n_layers,) bool
    rope_local_theta: float | None = None
    qk_norm: bool = False            # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    post_norms: bool = False         # Gemma: each block's output normed before the residual add
    activation: str = "silu"         # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_scale: float = 1.0     # Gemma: embeddings times sqrt(hidden), as float32
    attention_scale: float | None = None  # scores' scale; None: 1 / sqrt(head_dim)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    norm_offset: float = 0.0         # added to every norm weight at load: Gemma's (1 + w) in HF files
    # Sparse mixture of experts (Mixtral; see moe_config.py): 0 experts is a dense FFN
    n_experts: int = 0
    n_experts_used: int = 0          # top k of the router's softmax
    moe_norm_topk: bool = True       # the k weights renormalized to sum to 1

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
        if self.sliding_layers is not None:
            if self.sliding_window is None or len(self.sliding_layers) != self.n_layers \
                    or not all(isinstance(s, bool) for s in self.sliding_layers):
                raise ModelFileError(f"model config: sliding_layers must be {self.n_layers} true/false "
                                     "values, with a sliding_window")
        if self.rope_local_theta is not None and real(self.rope_local_theta, "model config: rope_local_theta") <= 0:
            raise ModelFileError(f"model config: rope_local_theta must be positive, got {self.rope_local_theta}")
        if self.activation not in _ACTIVATIONS.values():
            raise UnsupportedModelError(f"model config: MLP activation {shown(self.activation)} is not "
                                        f"supported; supported: {', '.join(_ACTIVATIONS.values())}")
        for name in ("embedding_scale", "attention_scale", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not real(value, f"model config: {name}") > 0:
                raise ModelFileError(f"model config: {name} must be positive, got {value}")
        real(self.norm_offset, "model config: norm_offset")
        if self.n_experts and not 1 <= integer(self.n_experts_used, "model config: n_experts_used") <= self.n_experts:
            raise ModelFileError(f"model config: {self.n_experts_used} experts used per token, of "
                                 f"{self.n_experts}")

    @property
    def rope_inv_freq(self) -> np.ndarray:
        """(head_dim // 2,) float64: the angle per position of each rotary pair, scaled."""
        return self.rope_scaling.inverse_frequencies(self.head_dim, self.rope_theta)

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's magnitude correction; 1 otherwise)."""
        return self.rope_scaling.attention_factor

    @property
    def kv_window(self) -> int | None:
        """The ring every layer's KV cache can be: the sliding window when all layers slide. Where
        only some do, every layer keeps the whole context and local layers attend to the last
        `sliding_window` positions of it."""
        return self.sliding_window if self.sliding_layers is None else None

    @property
    def kv_cache_len(self) -> int:
        """Entries per layer in the KV cache: a ring of `sliding_window` entries when windowed."""
        if self.kv_window is not None:
            return min(self.kv_window, self.context_length)
        return self.context_length

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it attends to the whole context)."""
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> str:
        """"local" where a sliding layer has its own RoPE base (Gemma 3), else "global"."""
        return "local" if self.rope_local_theta is not None and self.layer_window(layer) else "global"

    def rope_frequencies(self, kind: str = "global") -> tuple[np.ndarray, float]:
        """(inv_freq (head_dim // 2,) float64, attention factor) of global or local layers; local
        layers are unscaled, as transformers and llama.cpp run Gemma 3's."""
        if kind == "local":
            return RopeScaling().inverse_frequencies(self.head_dim, self.rope_local_theta), 1.0
        return self.rope_inv_freq, self.rope_attention_factor

    @property
    def query_factor(self) -> float:
        """What q is multiplied by so that the kernels' 1 / sqrt(head_dim) gives attention_scale."""
        if self.attention_scale is None:
            return 1.0
        return self.attention_scale * math.sqrt(self.head_dim)

    @property
    def plain_mlp(self) -> bool:
        """Whether every MLP block is what the compiled blocks implement: SwiGLU or GeGLU, with
        or without a post-norm, not a mixture of experts."""
        return not self.n_experts

    @classmethod
    def from_gguf(cls, metadata: dict, tensor_names=(), rope_freqs=None) -> "ModelConfig":
        """rope_freqs: the values of the file's `rope_freqs.weight` tensor, when it has one (a
        caller that only lists the file may leave them out: the config then lacks them)."""
        arch = metadata.get("general.architecture")
        if arch is None:
            raise ModelFileError("GGUF metadata has no general.architecture")
        refuse_unsupported_moe(arch, "architecture")
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
        n_layers = get("block_count", integer)
        extra = {}
        if arch == "gemma3":
            # llama.cpp's: every 6th layer global, local layers at base 10,000 (or the file's
            # rope.freq_base_swa) unscaled; norm weights hold (1 + w) already (the converter adds
            # 1); the 27B (62 layers) scales queries by 1 / sqrt(hidden / heads).
            sliding = tuple(i % GEMMA3_PATTERN < GEMMA3_PATTERN - 1 for i in range(n_layers)) if window else None
            extra = dict(
                sliding_layers=sliding if sliding and not all(sliding) else None,
                rope_local_theta=get("rope.freq_base_swa", real, GEMMA3_LOCAL_THETA) if window else None,
                post_norms=True, activation="gelu_tanh", embedding_scale=_embedding_scale(hidden),
                attention_scale=(hidden // n_heads) ** -0.5 if n_layers == 62 else None,
                final_logit_softcap=get("final_logit_softcapping", real, 0.0) or None)
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", integer),
            n_layers=n_layers,
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
            # llama.cpp permutes Q/K rows of llama files only (its NORM rope); the others are NEOX
            rope_interleaved=arch in ("llama", "mistral"),
            rope_scaling=scaling,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            **moe_from_gguf(arch, metadata, tensor_names, get, integer),
            **extra,
        )

    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        if not isinstance(config, dict):
            raise ModelFileError(f"config.json must hold a JSON object, got {shown(config)}")
        names = [config.get("model_type")] + list(_json_list(config.get("architectures")))
        refuse_unsupported_moe(config.get("model_type"), "config.json model_type")
        arch = next((_HF_ARCHITECTURES[n] for n in names if isinstance(n, str) and n in _HF_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"config.json model_type {shown(config.get('model_type'))} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch == "gemma3" and isinstance(config.get("text_config"), dict):  # the multimodal form
            config = dict({k: config[k] for k in ("tie_word_embeddings",) if k in config}, **config["text_config"])
        config = dict(_HF_DEFAULTS.get(arch, {}), **{k: v for k, v in config.items() if v is not None})
        global_rope, local_rope = _hf_rope_dicts(config, arch)
        scaling = rope_scaling_from_hf(dict(config, rope_scaling=global_rope, rope_parameters=None))

        def get(key, read, default=None, **limits):
            value = config.get(key)
            if value is None:  # absent, or JSON null
                if default is None:
                    raise ModelFileError(f"config.json is missing {key!r}")
                return default
            return read(value, f"config.json {key}", **limits)

        hidden = get("hidden_size", integer)
        n_heads = get("num_attention_heads", integer)
        n_layers = get("num_hidden_layers", integer)
        window, sliding = _hf_sliding(config, arch, n_layers, get)
        theta = config.get("rope_theta")  # else transformers >= 5's place, in the rope dict
        if theta is None and isinstance(global_rope, dict):
            theta = global_rope.get("rope_theta")
        extra = {}
        if arch in ("qwen3", "gemma3"):
            if get("attention_bias", flag, False):
                raise UnsupportedModelError(f"config.json: {arch} with attention_bias (a bias on the "
                                            "attention output too) is not supported")
            extra["qk_norm"] = True
        if arch == "gemma3":
            for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
                if config.get(key):
                    raise UnsupportedModelError(f"config.json: Gemma 3 with {key} {shown(config[key])} "
                                                "is not supported")
            act = config.get("hidden_activation", config.get("hidden_act"))
            if act not in _ACTIVATIONS:
                raise UnsupportedModelError(f"config.json: hidden activation {shown(act)} is not supported; "
                                            f"supported: {', '.join(_ACTIVATIONS)}")
            local_theta = local_rope.get("rope_theta", config.get("rope_local_base_freq", GEMMA3_LOCAL_THETA))
            extra.update(
                rope_local_theta=real(local_theta, "config.json rope_local_base_freq") if window else None,
                post_norms=True, activation=_ACTIVATIONS[act], embedding_scale=_embedding_scale(hidden),
                attention_scale=_positive(get("query_pre_attn_scalar", real), "config.json query_pre_attn_scalar") ** -0.5,
                final_logit_softcap=get("final_logit_softcapping", real, 0.0) or None, norm_offset=1.0)
            theta = GEMMA3_GLOBAL_THETA if theta is None else theta
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", integer),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", integer, n_heads),
            head_dim=get("head_dim", integer, hidden // n_heads),
            vocab_size=get("vocab_size", integer),
            context_length=get("max_position_embeddings", integer, 2048),
            sliding_window=window,
            sliding_layers=sliding,
            rope_theta=10000.0 if theta is None else real(theta, "config.json rope_theta"),
            norm_eps=get("rms_norm_eps", real, 1e-6),
            tie_embeddings=get("tie_word_embeddings", flag, False),
            attention_bias=arch == "qwen2" or get("attention_bias", flag, False),
            rope_interleaved=False,
            rope_scaling=scaling,
            **moe_from_hf(arch, config, get, integer),
            **extra,
        )


def _embedding_scale(hidden: int) -> float:
    """Gemma's sqrt(hidden), rounded to float32 as transformers (float32 weights) and llama.cpp
    multiply by it."""
    return float(np.float32(math.sqrt(hidden)))


def _hf_rope_dicts(config: dict, arch: str) -> tuple[dict, dict]:
    """(global, local) rope dicts of a config.json: transformers >= 5 keeps Gemma 3's per layer
    type in rope_parameters {"full_attention": ..., "sliding_attention": ...}; earlier configs
    have rope_scaling (global layers only), rope_theta and rope_local_base_freq."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and ("full_attention" in rope or "sliding_attention" in rope):
        if arch != "gemma3":
            raise UnsupportedModelError("config.json: RoPE parameters per layer type are supported "
                                        "for Gemma 3 only")
        global_rope, local_rope = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:
        global_rope, local_rope = config.get("rope_scaling") or rope or {}, {}
    if not isinstance(local_rope, dict):  # a global one that is not a dict: rope_scaling_from_hf says
        raise UnsupportedModelError(f"config.json: RoPE parameters {shown(rope)} are not supported")
    kind = local_rope.get("rope_type", local_rope.get("type", "default"))
    if kind != "default":
        raise UnsupportedModelError(f"config.json: RoPE scaling {shown(kind)} on sliding-window layers "
                                    "is not supported")
    return global_rope, local_rope


def _hf_sliding(config: dict, arch: str, n_layers: int, get) -> tuple[int | None, tuple | None]:
    """(sliding_window, sliding_layers) as transformers runs the config: Mistral slides every
    layer; Qwen2/3 only with use_sliding_window, the layers of `layer_types` (default: from
    max_window_layers on); Gemma 3 the layers of `layer_types` (default: all but every
    sliding_window_pattern-th). sliding_layers is None where every layer slides."""
    if arch == "llama":
        return None, None
    if arch in ("mistral", "mixtral"):
        return get("sliding_window", integer, 0, minimum=0) or None, None
    if arch in ("qwen2", "qwen3") and not get("use_sliding_window", flag, False):
        return None, None
    window = get("sliding_window", integer, 0, minimum=0) or None
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers \
                or not all(t in ("sliding_attention", "full_attention") for t in types):
            raise ModelFileError(f"config.json layer_types must list {n_layers} of 'sliding_attention' "
                                 f"and 'full_attention', got {shown(types)}")
        sliding = tuple(t == "sliding_attention" for t in types)
    elif arch == "gemma3":
        pattern = get("sliding_window_pattern", integer, GEMMA3_PATTERN)
        sliding = tuple(bool((i + 1) % pattern) for i in range(n_layers))
    else:
        first = get("max_window_layers", integer, 28, minimum=0)
        sliding = tuple(i >= first for i in range(n_layers))
    if window is None or not any(sliding):
        return None, None
    return window, None if all(sliding) else sliding


def _json_list(value) -> list:
    return value if isinstance(value, list) else []
