"""The Mistral/Llama/Qwen2 decoder: weights, per-sequence state, and the forward pass.

`forward` is the reference: plain NumPy over float32 copies of the weights, the oracle for the
faster paths. It is written once for T tokens at a time, and `prefill` runs the same code on
chunks of the prompt with the products done by the quantized kernels. `fast_forward` is the
one-token decode step: compiled kernels on the repacked quantized weights, writing into buffers
allocated once per state, with the products cut into tasks by the work-distribution scheduler.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..config import ModelConfig
from ..errors import ContextOverflowError, ModelFileError
from ..kernels import fused, gemm, ops, qmatmul
from ..kernels.adaptive import _get_num_threads, _matvec, attention_parallel_adaptive
from ..kernels.tensor_parallel import all_reduce_sum
from ..loader import release_pages, trim_heap
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

    @cached_property
    def packed(self) -> qmatmul.PackedWeight:
        # The layout the quantized kernels read; made once, at load.
        return qmatmul.prepare(self.weight)

    def __call__(self, x: np.ndarray, fast: bool = False) -> np.ndarray:
        """x: (T, in) -> (T, out)"""
        if fast:
            x = np.ascontiguousarray(x, np.float32)
            y = np.empty((x.shape[0], self.shape[0]), np.float32)
            if x.shape[0] >= gemm.MIN_TOKENS_FOR_BLAS:
                gemm.matmul_blas_into(self.packed, x, y, _get_num_threads())
            elif x.shape[0] == 1:  # the decode kernel: no tile is expanded to float32 first
                qmatmul.matvec_into(self.packed, x[0], y[0])
            else:
                qmatmul.matmul_into(self.packed, x, y)
        else:
            y = x @ self.dense.T
        return y if self.bias is None else y + self.bias

    def matvec_into(self, x: np.ndarray, out: np.ndarray, work=None) -> np.ndarray:
        """out = W @ x (+ bias) for one token, cut into tasks by `work` (a
        WorkDistributionConfig; None: the adaptive choice for this shape)."""
        _matvec(self.packed, x, out, work)
        if self.bias is not None:
            fused.add_bias(out, self.bias)
        return out


@dataclass
class Span:
    """A run of consecutive tokens of one sequence, from position `start`: one sequence's part
    of a micro-batch (a prompt chunk, or the one token of a decode step)."""
    state: "InferenceState"
    tokens: list
    start: int


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


@dataclass(frozen=True)
class ShardLayout:
    """The part of every layer that one model instance computes: all of it, or one
    tensor-parallel rank's heads, FFN rows and vocabulary slice."""
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    kv_map: tuple[int, ...]         # (n_heads,) local query head -> local KV head
    vocab_range: tuple[int, int]    # the rows of the output projection held here

    @classmethod
    def full(cls, config: ModelConfig) -> "ShardLayout":
        group = config.n_heads // config.n_kv_heads
        return cls(config.n_heads, config.n_kv_heads, config.intermediate_size,
                   tuple(h // group for h in range(config.n_heads)), (0, config.vocab_size))


def lazy_zeros(shape) -> np.ndarray:
    """float32 zeros in an anonymous mapping, resident page by page as written. (np.zeros asks
    the kernel for 2 MB huge pages on large arrays, so the first position cached in each layer
    would cost 2 MB per layer, K and V, per sequence: 120 MB on SmolLM2 before any real use.)"""
    nbytes = max(4, 4 * int(np.prod(shape)))
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32, count=nbytes // 4).reshape(shape)


class InferenceState:
    """Activations, KV cache and logits of one sequence, allocated once.

    The cache holds `config.kv_cache_len` entries per layer: the whole context, or a ring of
    `sliding_window` entries for a windowed model (position p lives in slot p % len). Its pages
    become resident only as positions are written, so a long context costs memory as it fills.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None,
                 layout: ShardLayout | None = None):
        self.config = config
        layout = layout or ShardLayout.full(config)
        self.max_seq_len = min(max_seq_len or config.context_length, config.context_length)
        self.cache_len = min(config.kv_cache_len, self.max_seq_len)
        shape = (config.n_layers, self.cache_len, layout.n_kv_heads, config.head_dim)
        self.k_cache = lazy_zeros(shape)  # (layers, cache_len, n_kv_heads, head_dim)
        self.v_cache = lazy_zeros(shape)
        self.logits = np.zeros(config.vocab_size, np.float32)  # (vocab,)
        self.pos = 0
        # One-token decode buffers, reused every step.
        kv_dim = layout.n_kv_heads * config.head_dim
        self.x = np.zeros(config.hidden_size, np.float32)       # residual stream
        self.h = np.zeros(config.hidden_size, np.float32)       # normed input of a block
        self.q = np.zeros((layout.n_heads, config.head_dim), np.float32)
        self.k = np.zeros(kv_dim, np.float32)
        self.v = np.zeros(kv_dim, np.float32)
        self.att = np.zeros((layout.n_heads, config.head_dim), np.float32)
        self.o = np.zeros(config.hidden_size, np.float32)       # a block's output
        self.gate = np.zeros(layout.intermediate_size, np.float32)
        self.up = np.zeros(layout.intermediate_size, np.float32)
        self.scores = np.zeros(self.cache_len, np.float32)

    def reset(self):
        self.pos = 0

    def cached_positions(self) -> np.ndarray:
        """Positions whose keys are in the cache now, oldest first."""
        return np.arange(max(0, self.pos - self.cache_len), self.pos)


class Mistral:
    """The decoder. With a `group` and a `layout` it is one tensor-parallel shard: its linears
    hold that rank's rows or columns, and the partial sums after the attention output, the FFN
    down projection and the vocabulary slice of the logits are all-reduced over the group."""

    def __init__(self, config: ModelConfig, embedding: QTensor, layers: list[LayerWeights],
                 output_norm: np.ndarray, output: Linear, layout: ShardLayout | None = None,
                 group=None):
        self.config = config
        self.embedding = embedding      # (vocab, hidden), stored format
        self.layers = layers
        self.output_norm = output_norm  # (hidden,)
        self.output = output            # (vocab or this shard's vocab slice, hidden)
        self.group = group              # None: the whole model in this process
        self.work = None                # WorkDistributionConfig of decode steps; None: adaptive
        self.set_layout(layout or ShardLayout.full(config))
        self._rope_cos = self._rope_sin = np.zeros((0, config.head_dim // 2), np.float32)

    def set_layout(self, layout: ShardLayout):
        self.layout = layout
        self.kv_map = np.array(layout.kv_map, dtype=np.int64)  # local query head -> local KV head

    def new_state(self, max_seq_len: int | None = None) -> InferenceState:
        return InferenceState(self.config, max_seq_len, self.layout)

    def _reduce(self, partial: np.ndarray) -> np.ndarray:
        """Sum a row-parallel product's partials over the group (nothing to do unsharded)."""
        return partial if self.group is None else all_reduce_sum(partial, self.group)

    def _gather_logits(self, local: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Logits (..., vocab) from this shard's vocabulary slice: the slices are disjoint, so
        an all-reduce of zero-padded slices is their concatenation."""
        v0, v1 = self.layout.vocab_range
        if (v0, v1) == (0, self.config.vocab_size):
            out[...] = local
            return out
        out[...] = 0.0
        out[..., v0:v1] = local
        return self._reduce(out)

    def linears(self) -> list[Linear]:
        return [getattr(layer, kind) for layer in self.layers
                for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                             "ffn_down")] + [self.output]

    def prepare_fast(self, release=None) -> "Mistral":
        """Repack every weight for the quantized kernels (once). `release(array)`, if given, drops
        a stored weight's file pages from memory as soon as it is repacked, so loading never
        holds the whole file and the whole repacked model at once."""
        for linear in self.linears():
            linear.packed
            if release is not None:
                release(linear.weight.data)
        trim_heap()
        return self

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every packed matrix, once."""
        return sum(linear.packed.nbytes for linear in self.linears())

    def rope_at(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (head_dim // 2,) of one position, from a table grown as positions come."""
        if pos >= len(self._rope_cos):
            n = max(2 * len(self._rope_cos), pos + 1, 256)
            self._rope_cos, self._rope_sin = ops.rope_tables(
                np.arange(n), self.config.head_dim, self.config.rope_theta)
        return self._rope_cos[pos], self._rope_sin[pos]

    @classmethod
    def load(cls, params, fast: bool = True) -> "Mistral":
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
                attn_norm=np.array(tensor(f"{p}.attn_norm.weight", (c.hidden_size,)).dequantize()),
                ffn_norm=np.array(tensor(f"{p}.ffn_norm.weight", (c.hidden_size,)).dequantize()),
                **{kind: linear(p, kind) for kind in expect}))
        embedding = tensor("token_embd.weight", (c.vocab_size, c.hidden_size))
        if "output.weight" in params.tensors:
            output = Linear(tensor("output.weight", (c.vocab_size, c.hidden_size)))
        else:
            output = Linear(embedding)  # tied embeddings
        model = cls(c, embedding, layers,
                    np.array(tensor("output_norm.weight", (c.hidden_size,)).dequantize()), output)
        return model.prepare_fast(release_pages) if fast else model

    # -- the reference path ------------------------------------------------------------------

    def embed(self, tokens) -> np.ndarray:
        """tokens -> (T, hidden) float32, dequantizing only the rows asked for."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return np.stack([self.embedding.row_slice(t, t + 1).dequantize()[0] for t in tokens])

    # -- many tokens of one or several sequences: the reference path, prefill, batched decode --

    def run_layers(self, spans: list["Span"], x: np.ndarray, start: int, stop: int,
                   fast: bool = False) -> np.ndarray:
        """Layers start..stop over a micro-batch: `spans` are runs of tokens of different
        sequences, whose rows are stacked in x (N, hidden). Every product is one matrix-matrix
        product over all N rows, so a weight is read once per micro-batch; only attention is
        per sequence. Positions come from the spans, not from state.pos, so pipeline stages
        can work on later tokens of a sequence before earlier ones have left the last stage."""
        c = self.config
        for li in range(start, stop):
            layer = self.layers[li]
            h = ops.rmsnorm(x, layer.attn_norm, c.norm_eps)
            x = x + self._attention_block(layer, li, spans, h, fast)
            h = ops.rmsnorm(x, layer.ffn_norm, c.norm_eps)
            x = x + self._reduce(
                layer.ffn_down(ops.silu(layer.ffn_gate(h, fast)) * layer.ffn_up(h, fast), fast))
        return x

    def finish(self, spans: list["Span"], x: np.ndarray, all_logits: bool = False,
               fast: bool = False) -> np.ndarray:
        """Logits after the last layer: of every row with all_logits, else of each span's last
        token (len(spans), vocab). Advances each sequence's position past its span."""
        rows = np.arange(len(x)) if all_logits else np.cumsum([len(sp.tokens) for sp in spans]) - 1
        h = ops.rmsnorm(x[rows], self.output_norm, self.config.norm_eps)
        logits = self._gather_logits(self.output(h, fast),
                                     np.empty((len(rows), self.config.vocab_size), np.float32))
        for sp in spans:
            sp.state.pos = max(sp.state.pos, sp.start + len(sp.tokens))
        return logits

    def forward_spans(self, spans: list["Span"], all_logits: bool = False,
                      fast: bool = True) -> np.ndarray:
        """A whole micro-batch through the model (see run_layers and finish)."""
        for sp in spans:
            if sp.start + len(sp.tokens) > sp.state.max_seq_len:
                raise ContextOverflowError(f"sequence of {sp.start + len(sp.tokens)} tokens does "
                                           f"not fit the context of {sp.state.max_seq_len}")
        x = self.embed([t for sp in spans for t in sp.tokens])
        return self.finish(spans, self.run_layers(spans, x, 0, len(self.layers), fast), all_logits, fast)

    def _attention_block(self, layer: LayerWeights, li: int, spans: list["Span"],
                         h: np.ndarray, fast: bool) -> np.ndarray:
        c = self.config
        n_heads, n_kv_heads = self.layout.n_heads, self.layout.n_kv_heads
        q = layer.attn_q(h, fast).reshape(len(h), n_heads, c.head_dim)
        k = layer.attn_k(h, fast).reshape(len(h), n_kv_heads, c.head_dim)
        v = layer.attn_v(h, fast).reshape(len(h), n_kv_heads, c.head_dim)
        out = np.empty((len(h), n_heads, c.head_dim), np.float32)
        row = 0
        for sp in spans:
            rows = slice(row, row + len(sp.tokens))
            row = rows.stop
            if fast and len(sp.tokens) == 1:  # a decode step: the compiled one-token kernel
                self._attend_one(li, sp, q[row - 1], k[row - 1], v[row - 1], out[row - 1])
            else:
                out[rows] = self._attend(li, sp, q[rows], k[rows], v[rows])
        return self._reduce(layer.attn_output(out.reshape(len(h), -1), fast))

    def _attend(self, li: int, sp: "Span", q, k, v) -> np.ndarray:
        c, state, T = self.config, sp.state, len(sp.tokens)
        positions = np.arange(sp.start, sp.start + T)
        cos, sin = ops.rope_tables(positions, c.head_dim, c.rope_theta)
        q = ops.apply_rope(q, cos, sin, c.rope_interleaved)
        k = ops.apply_rope(k, cos, sin, c.rope_interleaved)
        # Keys visible to this run: what the cache holds (in position order), then the run.
        past = np.arange(max(0, sp.start - state.cache_len), sp.start)
        slots = past % state.cache_len
        keys = np.concatenate([state.k_cache[li, slots], k])
        values = np.concatenate([state.v_cache[li, slots], v])
        key_pos = np.concatenate([past, positions])
        mask = key_pos[None, :] <= positions[:, None]
        if c.sliding_window is not None:
            mask &= positions[:, None] - key_pos[None, :] < c.sliding_window
        # Only the newest cache_len entries of the run survive in the ring.
        keep = slice(max(0, T - state.cache_len), T)
        state.k_cache[li, positions[keep] % state.cache_len] = k[keep]
        state.v_cache[li, positions[keep] % state.cache_len] = v[keep]
        return ops.attention(q, keys, values, mask, self.kv_map)

    def _attend_one(self, li: int, sp: "Span", q, k, v, out) -> None:
        state, pos = sp.state, sp.start
        cos, sin = self.rope_at(pos)
        slot = pos % state.cache_len
        fused.rope_rows(q, cos, sin, self.config.rope_interleaved)
        state.k_cache[li, slot] = k
        state.v_cache[li, slot] = v
        fused.rope_rows(state.k_cache[li, slot], cos, sin, self.config.rope_interleaved)
        attention_parallel_adaptive(q, state.k_cache[li], state.v_cache[li],
                                    min(pos + 1, state.cache_len), self.kv_map, out, scores=state.scores)

    def _forward_tokens(self, state: InferenceState, tokens, all_logits: bool,
                        fast: bool = False) -> np.ndarray:
        logits = self.forward_spans([Span(state, list(tokens), state.pos)], all_logits, fast)
        state.logits[:] = logits[-1]
        return logits

    def forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """One token through the reference path; leaves its logits in state.logits."""
        self._forward_tokens(state, [token], all_logits=False)
        return state.logits

    def fast_forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """One token through the compiled kernels; leaves its logits in state.logits."""
        if state.pos + 1 > state.max_seq_len:
            raise ContextOverflowError(
                f"sequence of {state.pos + 1} tokens does not fit the context of {state.max_seq_len}")
        self.embed_into(token, state.x)
        for li in range(len(self.layers)):
            self.decode_attention(li, state, self.work)
            self.decode_mlp(li, state, self.work)
        state.pos += 1
        return self.decode_logits(state)

    def decode_attention(self, li: int, state: InferenceState, work=None):
        """x += attention block of layer li for the token at state.pos (one token, in place)."""
        c, layer, x, h = self.config, self.layers[li], state.x, state.h
        cos, sin = self.rope_at(state.pos)
        slot = state.pos % state.cache_len
        fused.rmsnorm_into(x, layer.attn_norm, c.norm_eps, h)
        layer.attn_q.matvec_into(h, state.q.reshape(-1), work)
        layer.attn_k.matvec_into(h, state.k, work)
        layer.attn_v.matvec_into(h, state.v, work)
        k_cache, v_cache = state.k_cache[li], state.v_cache[li]  # (cache_len, n_kv, head_dim)
        k_new = k_cache[slot]  # (n_kv_heads, head_dim), a view into the cache
        k_new[:] = state.k.reshape(k_new.shape)
        v_cache[slot] = state.v.reshape(k_new.shape)
        fused.rope_rows(state.q, cos, sin, c.rope_interleaved)
        fused.rope_rows(k_new, cos, sin, c.rope_interleaved)
        attention_parallel_adaptive(state.q, k_cache, v_cache, min(state.pos + 1, state.cache_len),
                                    self.kv_map, state.att, scores=state.scores)
        layer.attn_output.matvec_into(state.att.reshape(-1), state.o, work)
        fused.add_into(x, self._reduce(state.o))

    def decode_mlp(self, li: int, state: InferenceState, work=None):
        """x += SwiGLU block of layer li (one token, in place)."""
        layer, x, h = self.layers[li], state.x, state.h
        fused.rmsnorm_into(x, layer.ffn_norm, self.config.norm_eps, h)
        layer.ffn_gate.matvec_into(h, state.gate, work)
        layer.ffn_up.matvec_into(h, state.up, work)
        fused.swiglu_into(state.gate, state.up, state.gate)
        layer.ffn_down.matvec_into(state.gate, state.o, work)
        fused.add_into(x, self._reduce(state.o))

    def decode_logits(self, state: InferenceState) -> np.ndarray:
        fused.rmsnorm_into(state.x, self.output_norm, self.config.norm_eps, state.h)
        v0, v1 = self.layout.vocab_range
        if (v0, v1) == (0, self.config.vocab_size):
            self.output.matvec_into(state.h, state.logits)
        else:
            state.logits[:] = 0.0
            self.output.matvec_into(state.h, state.logits[v0:v1])
            self._reduce(state.logits)
        return state.logits

    def embed_into(self, token: int, out: np.ndarray) -> np.ndarray:
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if self.output.weight is self.embedding and "packed" in self.output.__dict__:
            out[:] = qmatmul.dequantize_rows(self.output.packed, token, token + 1)[0]
        else:
            out[:] = self.embedding.row_slice(token, token + 1).dequantize()[0]
        return out

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
        with gemm.single_threaded_blas():
            outs = [self._forward_tokens(state, tokens[i:i + chunk_size], all_logits, fast=True)
                    for i in range(0, len(tokens), chunk_size)]
        return np.concatenate(outs) if all_logits else state.logits
