"""The mixture-of-experts keys of a model file (Mixtral's sparse MoE), and one-line refusals of
the MoE variants torchless cannot run, each naming what it lacks.

Supported: Mixtral's block, in transformers (`MixtralForCausalLM`: num_local_experts,
num_experts_per_tok) and in llama.cpp's GGUF (architecture `llama` with `llama.expert_count` and
`llama.expert_used_count`): a router (softmax over the experts), the top k, their weights
renormalized to sum to 1, and per token the weighted sum of those experts' SwiGLU FFNs.
"""

from __future__ import annotations

from .errors import UnsupportedModelError, shown

# What each known MoE family has that Mixtral's block does not.
_MISSING = {
    "qwen2_moe": "Qwen2-MoE's shared expert (with its sigmoid gate)",
    "qwen2moe": "Qwen2-MoE's shared expert (with its sigmoid gate)",
    "qwen3_moe": "Qwen3-MoE's experts of moe_intermediate_size on q/k-normed layers",
    "qwen3moe": "Qwen3-MoE's experts of moe_intermediate_size on q/k-normed layers",
    "deepseek_v2": "DeepSeek's shared experts, grouped top-k routing and latent attention (MLA)",
    "deepseek_v3": "DeepSeek's shared experts, grouped top-k routing and latent attention (MLA)",
    "deepseek2": "DeepSeek's shared experts, grouped top-k routing and latent attention (MLA)",
    "llama4": "Llama 4's shared expert and sigmoid top-1 routing",
    "dbrx": "DBRX's fused attention and expert layout",
    "olmoe": "OLMoE's q/k norms over whole projections",
    "phimoe": "PhiMoE's sparsemixer routing",
    "granitemoe": "Granite-MoE's scaled residuals and routing",
    "jamba": "Jamba's Mamba layers",
    "gpt_oss": "gpt-oss's attention sinks and clamped SwiGLU experts",
    "gpt-oss": "gpt-oss's attention sinks and clamped SwiGLU experts",
}


def refuse_unsupported_moe(name, where: str) -> None:
    """Raise for a model type or GGUF architecture that is a MoE family other than Mixtral."""
    if isinstance(name, str) and name in _MISSING:
        raise UnsupportedModelError(f"{where} {shown(name)} is not supported: {_MISSING[name]} "
                                    "(torchless runs Mixtral's sparse MoE only)")


def moe_from_gguf(arch: str, metadata: dict, tensor_names, get, integer) -> dict:
    """ModelConfig fields of a GGUF with experts (empty without): llama.cpp's `expert_count` and
    `expert_used_count`; shared experts, a gating function other than softmax and weight scaling
    are refused."""
    names = set(tensor_names)
    n_experts = get("expert_count", integer, 0, minimum=0)
    if get("expert_shared_count", integer, 0, minimum=0) or any("_shexp" in n for n in names):
        raise UnsupportedModelError("GGUF: shared experts (ffn_*_shexp tensors, expert_shared_count) "
                                    "are not supported")
    if not n_experts:
        if any(n.endswith(("ffn_gate_inp.weight", "_exps.weight")) for n in names):
            raise UnsupportedModelError(f"GGUF: expert tensors without {arch}.expert_count")
        return {}
    gating = metadata.get(f"{arch}.expert_gating_func")
    if gating not in (None, 1):  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise UnsupportedModelError(f"GGUF: expert gating function {shown(gating)} is not supported "
                                    "(only softmax, 1)")
    scale = metadata.get(f"{arch}.expert_weights_scale")
    if scale not in (None, 0, 0.0, 1, 1.0):
        raise UnsupportedModelError(f"GGUF: expert_weights_scale {shown(scale)} is not supported")
    width = metadata.get(f"{arch}.expert_feed_forward_length")
    if width is not None and width != metadata.get(f"{arch}.feed_forward_length"):
        raise UnsupportedModelError(f"GGUF: experts of {arch}.expert_feed_forward_length {shown(width)}, "
                                    "not feed_forward_length, are not supported")
    used = get("expert_used_count", integer)
    norm = metadata.get(f"{arch}.expert_weights_norm")
    return dict(n_experts=n_experts, n_experts_used=used,
                moe_norm_topk=True if norm is None else bool(norm))


def moe_from_hf(arch: str, config: dict, get, integer) -> dict:
    """ModelConfig fields of a Mixtral config.json (empty for a dense model)."""
    if arch != "mixtral":
        for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
            if config.get(key):
                raise UnsupportedModelError(f"config.json: {arch} with experts ({key} {shown(config[key])}) "
                                            "is not supported")
        return {}
    for key in ("n_shared_experts", "shared_expert_intermediate_size", "num_shared_experts"):
        if config.get(key):
            raise UnsupportedModelError(f"config.json: shared experts ({key} {shown(config[key])}) "
                                        "are not supported")
    return dict(n_experts=get("num_local_experts", integer, 8),
                n_experts_used=get("num_experts_per_tok", integer, 2))
