"""The Mistral/Llama/Qwen2 decoder: weights, per-sequence state, and the forward pass.

`forward` is the reference: plain NumPy over float32 copies of the weights, the oracle for the
faster paths. It is written once for T tokens at a time, so `prefill` is the same code on a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..config import ModelConfig
from ..errors import ContextOverflowError, ModelFileError
from ..kernels import ops
from ..quant import QTensor


class Linear:
    """One weight matrix (out_features, in_features) as stored in the file, and an optional bias."""

    def __init__(self, weight: QTensor, bias: QTensor | None = None):
        self.weight = weight
        self.bias = None if bias is None else bias.dequantize()

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @cached_property
    def dense(self) -> np.ndarray:
        # (out, in) float32; only the reference path pays for this copy.
        return np.ascontiguousarray(self.weight.dequantize(), dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (T, in) -> (T, out)"""
        y = x @ self.dense.T
        return y if self.bias is None else y + self.bias


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


class InferenceState:
    """Activations, KV cache and logits of one sequence, allocated once.

    The cache holds `config.kv_cache_len` entries per layer: the whole context, or a ring of
    `sliding_window` entries for a windowed model (position p lives in slot p % len).
    np.zeros maps untouched pages lazily, so a long context costs memory only as it fills.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None):
        self.config = config
        self.max_seq_len = min(max_seq_len or config.context_length, config.context_length)
        self.cache_len = min(config.kv_cache_len, self.max_seq_len)
        shape = (config.n_layers, self.cache_len, config.n_kv_heads, config.head_dim)
        self.k_cache = np.zeros(shape, np.float32)  # (layers, cache_len, n_kv_heads, head_dim)
        self.v_cache = np.zeros(shape, np.float32)
        self.logits = np.zeros(config.vocab_size, np.float32)  # (vocab,)
        self.pos = 0

    def reset(self):
        self.pos = 0

    def cached_positions(self) -> np.ndarray:
        """Positions whose keys are in the cache now, oldest first."""
        return np.arange(max(0, self.pos - self.cache_len), self.pos)


class Mistral:
    def __init__(self, config: ModelConfig, embedding: QTensor, layers: list[LayerWeights],
                 output_norm: np.ndarray, output: Linear):
        self.config = config
        self.embedding = embedding      # (vocab, hidden), stored format
        self.layers = layers
        self.output_norm = output_norm  # (hidden,)
        self.output = output            # (vocab, hidden)

    @classmethod
    def load(cls, params) -> "Mistral":
        c = params.config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        expect = {
            "attn_q": (q_dim, c.hidden_size), "attn_k": (kv_dim, c.hidden_size),
            "attn_v": (kv_dim, c.hidden_size), "attn_output": (c.hidden_size, q_dim),
            "ffn_gate": (c.intermediate_size, c.hidden_size),
            "ffn_up": (c.intermediate_size, c.hidden_size),
            "ffn_down": (c.hidden_size, c.intermediate_size),
        }

        def tensor(name, shape):
            t = params.tensors.get(name)
            if t is None:
                raise ModelFileError(f"{params.path}: missing tensor {name}")
            if tuple(t.shape) != tuple(shape):
                raise ModelFileError(f"{params.path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(shape)}")
            return t

        def linear(prefix, kind):
            bias = None
            if c.attention_bias and kind in ("attn_q", "attn_k", "attn_v"):
                bias = tensor(f"{prefix}.{kind}.bias", expect[kind][:1])
            return Linear(tensor(f"{prefix}.{kind}.weight", expect[kind]), bias)

        layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}"
            layers.append(LayerWeights(
                attn_norm=tensor(f"{p}.attn_norm.weight", (c.hidden_size,)).dequantize(),
                ffn_norm=tensor(f"{p}.ffn_norm.weight", (c.hidden_size,)).dequantize(),
                **{kind: linear(p, kind) for kind in expect}))
        embedding = tensor("token_embd.weight", (c.vocab_size, c.hidden_size))
        if "output.weight" in params.tensors:
            output = Linear(tensor("output.weight", (c.vocab_size, c.hidden_size)))
        else:
            output = Linear(embedding)  # tied embeddings
        return cls(c, embedding, layers,
                   tensor("output_norm.weight", (c.hidden_size,)).dequantize(), output)

    # -- the reference path ------------------------------------------------------------------

    def embed(self, tokens) -> np.ndarray:
        """tokens -> (T, hidden) float32, dequantizing only the rows asked for."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return np.stack([self.embedding.row_slice(t, t + 1).dequantize()[0] for t in tokens])

    def _attention_block(self, layer: LayerWeights, li: int, state: InferenceState,
                         h: np.ndarray, positions: np.ndarray) -> np.ndarray:
        c = self.config
        T = h.shape[0]
        q = layer.attn_q(h).reshape(T, c.n_heads, c.head_dim)
        k = layer.attn_k(h).reshape(T, c.n_kv_heads, c.head_dim)
        v = layer.attn_v(h).reshape(T, c.n_kv_heads, c.head_dim)
        cos, sin = ops.rope_tables(positions, c.head_dim, c.rope_theta)
        q = ops.apply_rope(q, cos, sin, c.rope_interleaved)
        k = ops.apply_rope(k, cos, sin, c.rope_interleaved)

        # Keys visible to this chunk: what the cache holds (in position order), then the chunk.
        past = state.cached_positions()
        slots = past % state.cache_len
        keys = np.concatenate([state.k_cache[li, slots], k])
        values = np.concatenate([state.v_cache[li, slots], v])
        key_pos = np.concatenate([past, positions])
        mask = key_pos[None, :] <= positions[:, None]
        if c.sliding_window is not None:
            mask &= positions[:, None] - key_pos[None, :] < c.sliding_window

        # Only the newest cache_len entries of the chunk survive in the ring.
        keep = slice(max(0, T - state.cache_len), T)
        state.k_cache[li, positions[keep] % state.cache_len] = k[keep]
        state.v_cache[li, positions[keep] % state.cache_len] = v[keep]

        out = ops.attention(q, keys, values, mask).reshape(T, c.n_heads * c.head_dim)
        return layer.attn_output(out)

    def _forward_tokens(self, state: InferenceState, tokens, all_logits: bool) -> np.ndarray:
        c = self.config
        T = len(tokens)
        if state.pos + T > state.max_seq_len:
            raise ContextOverflowError(
                f"sequence of {state.pos + T} tokens does not fit the context of {state.max_seq_len}")
        positions = np.arange(state.pos, state.pos + T)
        x = self.embed(tokens)  # (T, hidden)
        for li, layer in enumerate(self.layers):
            h = ops.rmsnorm(x, layer.attn_norm, c.norm_eps)
            x = x + self._attention_block(layer, li, state, h, positions)
            h = ops.rmsnorm(x, layer.ffn_norm, c.norm_eps)
            x = x + layer.ffn_down(ops.silu(layer.ffn_gate(h)) * layer.ffn_up(h))
        state.pos += T
        x = ops.rmsnorm(x if all_logits else x[-1:], self.output_norm, c.norm_eps)
        logits = self.output(x)  # (T or 1, vocab)
        state.logits[:] = logits[-1]
        return logits

    def forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """One token through the reference path; leaves its logits in state.logits."""
        self._forward_tokens(state, [token], all_logits=False)
        return state.logits

    def fast_forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        return self.forward(state, token, debug)

    def prefill(self, state: InferenceState, tokens, chunk_size: int = 256,
                all_logits: bool = False) -> np.ndarray:
        """Run many prompt tokens, `chunk_size` at a time as matrix-matrix products.

        Leaves the last token's logits in state.logits; with all_logits, returns (T, vocab).
        """
        tokens = list(tokens)
        if state.pos + len(tokens) > state.max_seq_len:
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens (after {state.pos} already in the sequence) does "
                f"not fit the context of {state.max_seq_len}")
        outs = [self._forward_tokens(state, tokens[i:i + chunk_size], all_logits)
                for i in range(0, len(tokens), chunk_size)]
        return np.concatenate(outs) if all_logits else state.logits
