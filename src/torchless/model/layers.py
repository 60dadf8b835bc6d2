"""What one decoder layer holds (LayerWeights), and the part of every layer that one model
instance computes (ShardLayout): all of it, or a tensor-parallel rank's share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from .linear import Linear
from .moe import MoE


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (hidden,)
    attn_q: Linear         # (n_heads * head_dim, hidden)
    attn_k: Linear         # (n_kv_heads * head_dim, hidden)
    attn_v: Linear         # (n_kv_heads * head_dim, hidden)
    attn_output: Linear    # (hidden, n_heads * head_dim)
    ffn_norm: np.ndarray   # (hidden,)
    ffn_gate: Linear       # (intermediate, hidden)
    ffn_up: Linear         # (intermediate, hidden)
    ffn_down: Linear       # (hidden, intermediate)
    attn_q_norm: np.ndarray | None = None          # (head_dim,) per-head norm of q (Qwen3, Gemma 3)
    attn_k_norm: np.ndarray | None = None          # (head_dim,)
    post_attention_norm: np.ndarray | None = None  # (hidden,) the attention output's norm (Gemma)
    post_ffw_norm: np.ndarray | None = None        # (hidden,) the MLP output's norm (Gemma)
    moe: "MoE | None" = None  # a sparse MoE FFN in place of gate/up/down (Mixtral; model/moe.py)

    def linears(self) -> list[Linear]:
        ffn = self.moe.linears() if self.moe is not None else [self.ffn_gate, self.ffn_up, self.ffn_down]
        return [self.attn_q, self.attn_k, self.attn_v, self.attn_output, *ffn]


ATTENTION_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output")
MLP_LINEARS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ShardLayout:
    """The part of every layer that one model instance computes: all of it, or one
    tensor-parallel rank's heads and FFN rows."""
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    kv_map: tuple[int, ...]         # (n_heads,) local query head -> local KV head

    @classmethod
    def full(cls, config: ModelConfig) -> "ShardLayout":
        group = config.n_heads // config.n_kv_heads
        return cls(config.n_heads, config.n_kv_heads, config.intermediate_size,
                   tuple(h // group for h in range(config.n_heads)))
