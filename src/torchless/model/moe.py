"""Mixtral's sparse mixture-of-experts FFN, and its expert-parallel shards.

A router (a linear of one row per expert) scores each token; the softmax of the scores, its top k
(`n_experts_used`), renormalized to sum to 1 (as transformers' MixtralTopKRouter does), weight
the outputs of those k experts, each a SwiGLU FFN down(silu(gate x) * up x). Each expert is a
plain `Linear` triple over a view of the mapped file, so the quantized kernels run it as any
other product, on the rows of the tokens routed to it.

Expert parallelism: a tensor-parallel rank keeps whole experts, its 1/world of them (a balanced
contiguous range), and the router whole. Every rank routes every token, runs the tokens routed
to its own experts, and the one all-reduce of the block sums the ranks' partial outputs: each
rank holds and reads 1/world of the expert weights.

Weights come in three layouts, all mapped without copying: llama.cpp's stacked 3-D tensors
(blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps, (experts, out, in)), transformers >= 5's
fused gate and up (ffn_gate_up_exps, from mlp.experts.gate_up_proj), and one tensor per expert
(Mixtral checkpoints' block_sparse_moe.experts.E.w1/w2/w3, and old llama.cpp files'
blk.N.ffn_gate.E.weight).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelFileError
from ..kernels import ops
from ..quant import QTensor
from .linear import Linear


def route(logits: np.ndarray, top_k: int, renormalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(weights (T, k) float32, experts (T, k) int64) of router logits (T, n_experts): the
    softmax's k largest, best first, renormalized to sum to 1."""
    logits = np.asarray(logits, np.float32)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    chosen = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(p, chosen, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(np.float32), chosen


def expert_view(stacked: QTensor, e: int, rows: tuple[int, int] | None = None) -> QTensor:
    """Expert e of a stacked (experts, out, in) tensor as a 2-D view (its rows start..stop)."""
    t = QTensor(stacked.ggml_type, stacked.shape[1:], stacked.data[e])
    return t.row_slice(*rows) if rows else t


class MoE:
    """One layer's sparse MoE FFN: x (T, hidden) -> (T, hidden). `experts` maps an expert id to
    its (gate, up, down) Linears: all of them, or an expert-parallel rank's share, whose partial
    output `group` all-reduces (None: the whole block in this process)."""

    def __init__(self, router: Linear, experts: dict, n_experts: int, top_k: int,
                 renormalize: bool = True, group=None):
        self.router, self.experts, self.n_experts = router, experts, n_experts
        self.top_k, self.renormalize, self.group = top_k, renormalize, group

    @classmethod
    def load(cls, tensors: dict, prefix: str, config, tensor) -> "MoE":
        """Layer `prefix`'s (blk.N) router and experts, in whichever layout the file has;
        `tensor(name, shape)` fetches one, checking its shape."""
        c = config
        E, hidden, inter = c.n_experts, c.hidden_size, c.intermediate_size
        router = Linear(tensor(f"{prefix}.ffn_gate_inp.weight", (E, hidden)))
        down_shape = (E, hidden, inter)
        if f"{prefix}.ffn_gate_exps.weight" in tensors:
            gate = tensor(f"{prefix}.ffn_gate_exps.weight", (E, inter, hidden))
            up = tensor(f"{prefix}.ffn_up_exps.weight", (E, inter, hidden))
            down = tensor(f"{prefix}.ffn_down_exps.weight", down_shape)
            experts = {e: (expert_view(gate, e), expert_view(up, e), expert_view(down, e)) for e in range(E)}
        elif f"{prefix}.ffn_gate_up_exps.weight" in tensors:
            gate_up = tensor(f"{prefix}.ffn_gate_up_exps.weight", (E, 2 * inter, hidden))
            down = tensor(f"{prefix}.ffn_down_exps.weight", down_shape)
            experts = {e: (expert_view(gate_up, e, (0, inter)), expert_view(gate_up, e, (inter, 2 * inter)),
                           expert_view(down, e)) for e in range(E)}
        elif f"{prefix}.ffn_gate.0.weight" in tensors:
            experts = {e: tuple(tensor(f"{prefix}.{kind}.{e}.weight", shape) for kind, shape in
                                (("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                                 ("ffn_down", (hidden, inter)))) for e in range(E)}
        else:
            raise ModelFileError(f"missing the expert tensors of {prefix} ({prefix}.ffn_gate_exps.weight "
                                 f"or {prefix}.ffn_gate.0.weight)")
        return cls(router, {e: tuple(Linear(w) for w in ws) for e, ws in experts.items()},
                   E, c.n_experts_used, c.moe_norm_topk)

    def linears(self) -> list[Linear]:
        return [self.router] + self.expert_linears()

    def expert_linears(self) -> list[Linear]:
        return [linear for e in sorted(self.experts) for linear in self.experts[e]]

    def unread_bytes_per_token(self) -> int:
        """Bytes of the experts held here that a token does not read, on average: all but
        top_k / n_experts of them."""
        held = sum(linear.packed.nbytes for linear in self.expert_linears())
        return held - held * self.top_k // self.n_experts

    def shard(self, tp, group) -> "MoE":
        """Expert parallelism: tp's rank keeps experts local_range(n_experts), the router whole."""
        e0, e1 = tp.local_range(self.n_experts)
        return MoE(self.router, {e: self.experts[e] for e in range(e0, e1)}, self.n_experts,
                   self.top_k, self.renormalize, group if tp.world_size > 1 else None)

    def __call__(self, x: np.ndarray, fast: bool = False, work=None) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        weights, chosen = route(self.router(x, fast, work), self.top_k, self.renormalize)
        out = np.zeros_like(x)
        for e in np.unique(chosen):  # ascending ids, as transformers adds the experts up
            if int(e) not in self.experts:
                continue  # another rank's expert
            rows, slot = np.nonzero(chosen == e)
            gate, up, down = self.experts[int(e)]
            h = x[rows]
            y = down(ops.silu(gate(h, fast, work)) * up(h, fast, work), fast, work)
            out[rows] += y * weights[rows, slot, None]
        if self.group is not None:
            self.group.all_reduce_sum(out)
        return out
