"""The Llama-family decoder (Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma 3): weights, per-sequence
state, and the forward pass.

`forward` is the reference: plain NumPy over float32 copies of the weights, the oracle for the
faster paths. It is written once for T tokens at a time, and `prefill` runs the same code on
chunks of the prompt with the products done by the quantized kernels. `fast_forward` is the
one-token decode step: compiled kernels on the repacked quantized weights, writing into buffers
allocated once per state, with the products cut into tasks by the work-distribution scheduler.
A decode step runs each layer as one compiled `nogil` call, and a micro-batch (decode steps
and prompt chunks of different sequences) each block of a layer (kernels/fused_layer.py), so the
GIL is held only between them. The compiled blocks take Llama's, Qwen3's and Gemma 3's layers
(q/k norms, output norms, GeGLU, per-layer windows and RoPE bases); Mixtral's experts run
kernel by kernel, and in a decode step so does the rest of their layer, as do a prompt chunk
that would wrap a ring of its cache and a prompt alone in its micro-batch (`_fusable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import ContextOverflowError, ModelFileError, TorchlessError
from numba import typed

from ..kernels import fused, fused_layer, gemm, ops, qmatmul
from ..kernels.adaptive import _get_num_threads, attention_parallel_adaptive
from ..loader import release_pages, trim_heap
from ..quant import QTensor
from .kv_cache import KVCache
from .layers import ATTENTION_LINEARS, MLP_LINEARS, LayerWeights, ShardLayout  # noqa: F401 (re-exported)
from .linear import Linear
from .moe import MoE


@dataclass
class Span:
    """A run of consecutive tokens of one sequence, from position `start`: one sequence's part
    of a micro-batch (a prompt chunk, or the one token of a decode step)."""
    state: "InferenceState"
    tokens: list
    start: int


class InferenceState:
    """One sequence: its KV cache (`cache`), its logits, and the one-token decode buffers,
    allocated once. The cache holds the whole context, or a ring of `sliding_window` entries
    for a windowed model; its pages become resident only as positions are written."""

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None,
                 layout: ShardLayout | None = None):
        self.config = config
        layout = layout or ShardLayout.full(config)
        max_seq_len = min(max_seq_len or config.context_length, config.context_length)
        layer_windows = None
        if config.sliding_layers is not None:
            layer_windows = tuple(config.layer_window(i) for i in range(config.n_layers))
        self.cache = KVCache(config.n_layers, layout.n_kv_heads, config.head_dim, max_seq_len,
                             config.kv_window, layer_windows)
        self.logits = np.zeros(config.vocab_size, np.float32)  # (vocab,)
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
        self.scores = np.zeros(0, np.float32)  # attention scores of one head, grown as needed

    @property
    def pos(self) -> int:
        """The next position of the sequence."""
        return self.cache.pos

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def reset(self):
        self.cache.reset()


class Mistral:
    """The decoder. It knows nothing of parallelism: a tensor-parallel shard (parallel.py) is
    this class with smaller layouts and linears that reduce themselves over their group."""

    def __init__(self, config: ModelConfig, embedding: QTensor, layers: list[LayerWeights],
                 output_norm: np.ndarray, output: Linear, layout: ShardLayout | None = None):
        self.config = config
        self.embedding = embedding      # (vocab, hidden), stored format
        self.layers = layers
        self.output_norm = output_norm  # (hidden,)
        self.output = output            # (vocab, hidden), or a vocabulary-parallel slice
        self.work = None                # WorkDistributionConfig of decode steps; None: adaptive
        self.layout = layout or ShardLayout.full(config)
        self.kv_map = np.array(self.layout.kv_map, dtype=np.int64)  # local query head -> local KV head
        self._rope_cos = self._rope_sin = np.zeros((0, config.head_dim // 2), np.float32)
        self._rope_local = (self._rope_cos, self._rope_sin)  # the tables of local layers (Gemma 3)
        self._fused_weights: dict = {}  # (work, threads) -> per layer (attention, mlp) weight tuples
        self._block_norms = None  # per layer, the compiled blocks' norm arguments (_norm_args)

    def new_state(self, max_seq_len: int | None = None) -> InferenceState:
        return InferenceState(self.config, max_seq_len, self.layout)

    def linears(self) -> list[Linear]:
        return [linear for layer in self.layers for linear in layer.linears()] + [self.output]

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
        """Bytes of weights one decode step reads: every packed matrix, once; of a MoE layer's
        experts, the top k of n_experts that a token is routed to (on average)."""
        return sum(linear.packed.nbytes for linear in self.linears()) - sum(
            layer.moe.unread_bytes_per_token() for layer in self.layers if layer.moe is not None)

    def fused_blocks(self, work=None) -> list[tuple]:
        """Per layer, the weight tuples of its attention block (q, k, v, output) and of its
        gated MLP block (gate, up, down) for the compiled blocks of kernels/fused_layer.py; None
        for a block with a linear that is not a plain Linear (a tensor-parallel shard's, which
        all-reduces its product), and for a mixture of experts (ModelConfig.plain_mlp). A
        decode step fuses a layer whose blocks both have them (decode_layer) and runs any other
        layer kernel by kernel; a micro-batch of decode steps is fused where every block of the
        layers it runs has them (_fusable)."""
        n_threads = _get_num_threads()
        blocks = self._fused_weights.get((work, n_threads))
        if blocks is None:
            plain = {ATTENTION_LINEARS: True, MLP_LINEARS: self.config.plain_mlp}

            def block(layer, kinds):
                linears = [getattr(layer, kind) for kind in kinds]
                if not plain[kinds] or any(type(linear) is not Linear for linear in linears):
                    return None
                return tuple(fused_layer.weight_args(linear, work, n_threads) for linear in linears)

            blocks = self._fused_weights[(work, n_threads)] = [
                (block(layer, ATTENTION_LINEARS), block(layer, MLP_LINEARS)) for layer in self.layers]
        return blocks

    def rope_at(self, pos: int, kind: str = "global") -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (head_dim // 2,) of one position for global or local layers (see
        ModelConfig.layer_rope), from tables grown as positions come (both kinds at once)."""
        if pos >= len(self._rope_cos):
            n = max(2 * len(self._rope_cos), pos + 1, 256)
            if self.config.rope_local_theta is not None:
                self._rope_local = ops.rope_tables(np.arange(n), *self.config.rope_frequencies("local"))
            self._rope_cos, self._rope_sin = ops.rope_tables(
                np.arange(n), self.config.rope_inv_freq, self.config.rope_attention_factor)
        cos, sin = self._rope_local if kind == "local" else (self._rope_cos, self._rope_sin)
        return cos[pos], sin[pos]

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

        def norm(name, size=c.hidden_size):  # float32; Gemma's (1 + w) made here, as transformers does
            weight = np.array(tensor(name, (size,)).dequantize(), np.float32)
            return weight + np.float32(c.norm_offset) if c.norm_offset else weight

        layers = []
        for i in range(c.n_layers):
            p = f"blk.{i}"
            extra = {}
            if c.qk_norm:
                extra.update(attn_q_norm=norm(f"{p}.attn_q_norm.weight", c.head_dim),
                             attn_k_norm=norm(f"{p}.attn_k_norm.weight", c.head_dim))
            if c.post_norms:
                extra.update(post_attention_norm=norm(f"{p}.post_attention_norm.weight"),
                             post_ffw_norm=norm(f"{p}.post_ffw_norm.weight"))
            if c.n_experts:  # Mixtral: the experts in place of the dense FFN
                extra.update(moe=MoE.load(params.tensors, p, c, tensor), ffn_gate=None, ffn_up=None, ffn_down=None)
            layers.append(LayerWeights(
                attn_norm=norm(f"{p}.attn_norm.weight"), ffn_norm=norm(f"{p}.ffn_norm.weight"),
                **{kind: linear(p, kind) for kind in expect if kind not in extra}, **extra))
        embedding = tensor("token_embd.weight", (c.vocab_size, c.hidden_size))
        if "output.weight" in params.tensors:
            output = Linear(tensor("output.weight", (c.vocab_size, c.hidden_size)))
        else:
            output = Linear(embedding)  # tied embeddings
        model = cls(c, embedding, layers, norm("output_norm.weight"), output)
        return model.prepare_fast(release_pages) if fast else model

    # -- the reference path ------------------------------------------------------------------

    def embed(self, tokens) -> np.ndarray:
        """tokens -> (T, hidden) float32, dequantizing only the rows asked for."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        rows = np.stack([self._embedding_row(int(t)) for t in tokens]) if tokens.size else \
            np.zeros((0, self.config.hidden_size), np.float32)
        if self.output.weight is not self.embedding:
            release_pages(self.embedding.data)
        return rows * np.float32(self.config.embedding_scale) if self.config.embedding_scale != 1.0 else rows

    def _embedding_row(self, token: int) -> np.ndarray:
        """One row of the embedding, float32. Tied to the LM head, it comes from the head's packed
        copy (equal to the file's row), not the file: each row read from the mapping faults in
        the pages around it too (the kernel's fault-around, 64 KiB), so a prompt of random tokens
        made ~16 MB of SmolLM2's embedding resident. Untied, `embed` drops the pages after use."""
        if self.output.weight is self.embedding and "packed" in self.output.__dict__:
            return qmatmul.dequantize_rows(self.output.packed, token, token + 1)[0]
        return self.embedding.row_slice(token, token + 1).dequantize()[0]

    # -- many tokens of one or several sequences: the reference path, prefill, batched decode --

    def run_layers(self, spans: list["Span"], x: np.ndarray, start: int, stop: int,
                   fast: bool = False) -> np.ndarray:
        """Layers start..stop over a micro-batch: `spans` are runs of tokens of different
        sequences, whose rows are stacked in x (N, hidden). Every product is one matrix-matrix
        product over all N rows, so a weight is read once per micro-batch; only attention is
        per sequence. Positions come from the spans, not from the caches, so pipeline stages
        can work on later tokens of a sequence before earlier ones have left the last stage."""
        c = self.config
        if fast and self._fusable(spans, start, stop):
            return self._run_layers_fused(spans, x, start, stop)
        for li in range(start, stop):
            layer = self.layers[li]
            h = ops.rmsnorm(x, layer.attn_norm, c.norm_eps)
            out = self._attention_block(layer, li, spans, h, fast)
            if layer.post_attention_norm is not None:
                out = ops.rmsnorm(out, layer.post_attention_norm, c.norm_eps)
            x = x + out
            del out
            out = self._mlp_block(layer, ops.rmsnorm(x, layer.ffn_norm, c.norm_eps), fast)
            if layer.post_ffw_norm is not None:
                out = ops.rmsnorm(out, layer.post_ffw_norm, c.norm_eps)
            x = x + out
            del out
        return x

    def _mlp_block(self, layer: LayerWeights, h: np.ndarray, fast: bool) -> np.ndarray:
        """The MLP of normed rows h. Its own function, so that no array of a layer's outputs
        (a prompt chunk's are 1.5 MB each on SmolLM2) lives on through the next layer's; with
        the activation in place in the fast path, a 256-token prefill's peak of arrays went
        from 7.2 to 5.6 MB (tracemalloc)."""
        if layer.moe is not None:
            return layer.moe(h, fast, self.work)
        gate, up = layer.ffn_gate(h, fast, self.work), layer.ffn_up(h, fast, self.work)
        if fast:  # in place: the compiled blocks' activation (fused.glu_rows)
            fused.glu_matrix(gate, up, self.config.activation == "gelu_tanh")
        else:
            gate = self._activation(gate) * up
        del up
        return layer.ffn_down(gate, fast, self.work)

    def _activation(self, gate: np.ndarray) -> np.ndarray:
        return gelu_tanh(gate) if self.config.activation == "gelu_tanh" else ops.silu(gate)

    def _fusable(self, spans: list["Span"], start: int, stop: int) -> bool:
        """Whether a micro-batch runs as compiled blocks: spans of distinct sequences, every block
        fusable, and each span of several tokens (a prompt chunk) beside others and within every
        ring of its cache: a block writes all rows' keys and then lets each row attend to the
        slots up to its own position, so no row may overwrite a key that an earlier row of its
        span still attends."""
        if len({id(sp.state) for sp in spans}) < len(spans):
            return False
        if len(spans) == 1 and len(spans[0].tokens) > 1:
            # A prompt alone runs kernel by kernel, as fast (a 256-token prefill of SmolLM2 at 1
            # and 2 threads), without loading the blocks' compiled code into a process that
            # decodes one sequence (layer_block): that cost it 22 MB of peak RSS (343 against
            # 321 MB, `benchmarks/bench_pipeline.py --modes sequential`).
            return False
        if any(len(sp.tokens) > 1 and sp.start + len(sp.tokens) > sp.state.cache.ring_room() for sp in spans):
            return False
        if len({sp.state.cache.local_len for sp in spans}) > 1:
            # a sequence whose context fits the window keeps its windowed layers whole: the
            # blocks take one layout of caches (which layers are rings) for all sequences
            return False
        return all(a is not None and m is not None for a, m in self.fused_blocks(self.work)[start:stop])

    def _run_layers_fused(self, spans: list["Span"], x: np.ndarray, start: int, stop: int) -> np.ndarray:
        """run_layers as compiled blocks: per layer one call per block, each product once for
        all rows, each row (a token of a span) attending over its sequence's cache (the layer's
        ring: whole, or its window's where the layer is local) up to its own position."""
        c, n_threads = self.config, _get_num_threads()
        caches = [sp.state.cache for sp in spans for _ in sp.tokens]  # per row
        positions = np.concatenate([np.arange(sp.start, sp.start + len(sp.tokens)) for sp in spans])
        for sp in spans:  # before the arrays are handed over: growing replaces them
            sp.state.cache._reserve(sp.start + len(sp.tokens))
        self.rope_at(int(positions.max()))
        inline = fused_layer.inline_bytes(n_threads)
        rings = {}  # per kind of layer (whole cache, local ring): what its attention block takes

        def ring(li: int) -> tuple:
            keys, _, index = caches[0].rings_of(li)  # one layout for all caches (_fusable)
            kind = (id(keys), c.layer_rope(li))  # which arrays (whole, windowed), which RoPE
            if kind not in rings:
                length = np.array([ca.ring_length(li) for ca in caches], np.int64)  # per sequence
                n_valid = np.minimum(positions + 1, length)
                cos, sin = self._rope_local if kind[1] == "local" else (self._rope_cos, self._rope_sin)
                kv_bytes = 2 * 4 * self.layout.n_kv_heads * c.head_dim * int(n_valid.sum())
                plan = fused_layer.attention_plan(len(positions) * self.layout.n_heads, int(n_valid.mean()),
                                                  kv_bytes, self.work, n_threads)
                rings[kind] = (cos[positions], sin[positions], c.rope_interleaved,
                               typed.List([ca.rings_of(li)[0] for ca in caches]),
                               typed.List([ca.rings_of(li)[1] for ca in caches]),
                               positions % length, n_valid, plan)
            cos, sin, interleaved, k_caches, v_caches, slots, n_valid, plan = rings[kind]
            return cos, sin, interleaved, k_caches, v_caches, index, slots, n_valid, self.kv_map, plan

        x = np.array(x, np.float32)  # updated in place: not the caller's array
        blocks = self.fused_blocks(self.work)
        for li in range(start, stop):
            layer, (attention, mlp) = self.layers[li], blocks[li]
            qk, post = self._norm_args(li)
            fused_layer.run_counted(fused_layer.batch_attention_block, x, layer.attn_norm, c.norm_eps,
                                    *attention, qk, post[0], *ring(li), inline)
            fused_layer.run_counted(fused_layer.batch_mlp_block, x, layer.ffn_norm, c.norm_eps, *mlp,
                                    post, self.layout.intermediate_size, inline)
        return x

    def finish(self, spans: list["Span"], x: np.ndarray, all_logits: bool = False,
               fast: bool = False) -> np.ndarray:
        """Logits after the last layer: of every row with all_logits, else of each span's last
        token (len(spans), vocab). Advances each sequence's cache past its span."""
        rows = np.arange(len(x)) if all_logits else np.cumsum([len(sp.tokens) for sp in spans]) - 1
        logits = self.output(ops.rmsnorm(x[rows], self.output_norm, self.config.norm_eps), fast, self.work)
        softcap(logits, self.config.final_logit_softcap)
        for sp in spans:
            sp.state.cache.advance(sp.start + len(sp.tokens))
        return logits

    def forward_spans(self, spans: list["Span"], all_logits: bool = False,
                      fast: bool = True) -> np.ndarray:
        """A whole micro-batch through the model (see run_layers and finish)."""
        if fast and not all_logits and len(spans) == 1 and len(spans[0].tokens) == 1 \
                and spans[0].start == spans[0].state.pos:
            # One sequence's decode step: the float matvec kernels, as generate_tokens runs it.
            # On one row they beat the batched kernels of the time (integer dots under 4 rows)
            # by ~10% (SmolLM2, 1 and 2 threads): a row is bound by reading the weights, not
            # by multiply-adds.
            sp = spans[0]
            return self.fast_forward(sp.state, int(sp.tokens[0]))[None].copy()
        for sp in spans:
            sp.state.cache.check_fits(sp.start + len(sp.tokens))
        x = self.embed([t for sp in spans for t in sp.tokens])
        return self.finish(spans, self.run_layers(spans, x, 0, len(self.layers), fast), all_logits, fast)

    def _attention_block(self, layer: LayerWeights, li: int, spans: list["Span"],
                         h: np.ndarray, fast: bool) -> np.ndarray:
        c, w = self.config, self.work
        n_heads, n_kv_heads = self.layout.n_heads, self.layout.n_kv_heads
        q = layer.attn_q(h, fast, w).reshape(len(h), n_heads, c.head_dim)
        k = layer.attn_k(h, fast, w).reshape(len(h), n_kv_heads, c.head_dim)
        v = layer.attn_v(h, fast, w).reshape(len(h), n_kv_heads, c.head_dim)
        q, k = self._qk_norm_and_scale(layer, q, k)
        out = np.empty((len(h), n_heads, c.head_dim), np.float32)
        row = 0
        for sp in spans:
            rows = slice(row, row + len(sp.tokens))
            row = rows.stop
            if fast and len(sp.tokens) == 1:  # a decode step: the compiled one-token kernel
                self._attend_one(li, sp.state, sp.start, q[row - 1], k[row - 1], v[row - 1],
                                 out[row - 1], w)
            else:
                out[rows] = self._attend(li, sp, q[rows], k[rows], v[rows], fast)
        return layer.attn_output(out.reshape(len(h), -1), fast, w)

    def _qk_norm_and_scale(self, layer: LayerWeights, q: np.ndarray, k: np.ndarray):
        """q, k (..., heads, head_dim) before RoPE: each head RMS-normed (Qwen3, Gemma 3), and q
        scaled so that the attention kernels' 1 / sqrt(head_dim) gives the model's scale."""
        c = self.config
        if layer.attn_q_norm is not None:
            q = ops.rmsnorm(q, layer.attn_q_norm, c.norm_eps)
            k = ops.rmsnorm(k, layer.attn_k_norm, c.norm_eps)
        if c.query_factor != 1.0:
            q = q * np.float32(c.query_factor)
        return q, k

    def _attend(self, li: int, sp: "Span", q, k, v, fast: bool = False) -> np.ndarray:
        c, cache = self.config, sp.state.cache
        positions = np.arange(sp.start, sp.start + len(sp.tokens))
        cos, sin = ops.rope_tables(positions, *c.rope_frequencies(c.layer_rope(li)))
        q = ops.apply_rope(q, cos, sin, c.rope_interleaved)
        k = ops.apply_rope(k, cos, sin, c.rope_interleaved)
        end, window = positions[-1] + 1, c.layer_window(li)
        if fast and end <= cache.ring_length(li) and (window is None or end <= window):
            # Nothing wrapped or slid out of sight: each row attends a prefix of the cache, on
            # numba's threads. The NumPy path below scores every pair, masked ones included, on
            # this thread alone: a fifth of SmolLM2's 256-token prefill at 1 thread, which this
            # makes 1.27x faster (benchmarks/profile_prefill.py).
            cache.write(li, positions, k, v)
            k_layer, v_layer = cache.layer(li)
            out = np.empty_like(q)
            fused.attend_causal_rows(q, k_layer, v_layer, sp.start, self.kv_map, out)
            return out
        # Keys visible to this run: what the cache holds (in position order), then the run.
        past_k, past_v, past = cache.window(li, sp.start)
        keys, values = np.concatenate([past_k, k]), np.concatenate([past_v, v])
        key_pos = np.concatenate([past, positions])
        mask = key_pos[None, :] <= positions[:, None]
        window = c.layer_window(li)
        if window is not None:
            mask &= positions[:, None] - key_pos[None, :] < window
        cache.write(li, positions, k, v)
        return ops.attention(q, keys, values, mask, self.kv_map)

    def _attend_one(self, li: int, state: InferenceState, pos: int, q, k, v, out, work=None) -> None:
        """One query token at `pos`: RoPE on q and k (in place), k and v into the cache, then
        attention over the cached keys, heads cut into tasks by `work`."""
        cos, sin = self.rope_at(pos, self.config.layer_rope(li))
        rope, cache = self.config.rope_interleaved, state.cache
        fused.rope_rows(q, cos, sin, rope)
        fused.rope_rows(k, cos, sin, rope)
        cache.write(li, np.array([pos]), k[None], v[None])
        k_layer, v_layer, n_valid = cache.attended(li, pos)
        if state.scores.shape[0] < n_valid:
            state.scores = np.empty(k_layer.shape[0], np.float32)
        attention_parallel_adaptive(q, k_layer, v_layer, n_valid, self.kv_map, out,
                                    config=work, scores=state.scores)

    def _forward_tokens(self, state: InferenceState, tokens, all_logits: bool,
                        fast: bool = False) -> np.ndarray:
        logits = self.forward_spans([Span(state, list(tokens), state.pos)], all_logits, fast)
        state.logits[:] = logits[-1]
        return logits

    def forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """One token through the reference path; leaves its logits in state.logits. debug:
        raise, naming the layer, as soon as an activation stops being finite."""
        if not debug:
            self._forward_tokens(state, [token], all_logits=False)
            return state.logits
        sp = Span(state, [int(token)], state.pos)
        state.cache.check_fits(sp.start + 1)
        x = self.embed(sp.tokens)
        for li in range(len(self.layers)):
            x = self.run_layers([sp], x, li, li + 1)
            check_finite(x, f"layer {li}")
        state.logits[:] = self.finish([sp], x)[-1]
        check_finite(state.logits, "the output projection")
        return state.logits

    def fast_forward(self, state: InferenceState, token: int, debug: bool = False) -> np.ndarray:
        """One token through the compiled kernels; leaves its logits in state.logits. debug:
        raise, naming the block, as soon as an activation stops being finite."""
        state.cache.check_fits(state.pos + 1)
        self.embed_into(token, state.x)
        for li in range(len(self.layers)):
            if not debug and self.decode_layer(li, state, self.work):
                continue
            self.decode_attention(li, state, self.work)
            if debug:
                check_finite(state.x, f"layer {li} attention")
            self.decode_mlp(li, state, self.work)
            if debug:
                check_finite(state.x, f"layer {li} MLP")
        state.cache.advance(state.pos + 1)
        logits = self.decode_logits(state, self.work)
        if debug:
            check_finite(logits, "the output projection")
        return logits

    def _attention_args(self, li: int, state: InferenceState, work) -> tuple:
        """The arguments of fused_layer.layer_block from the layer's cache on; grows the cache
        and state.scores to hold the token."""
        c, cache, pos, n_threads = self.config, state.cache, state.pos, _get_num_threads()
        cache._reserve(pos + 1)  # every ring (whole, windowed) up to the token's slot
        k_layer, v_layer, n_valid = cache.attended(li, pos)
        if state.scores.shape[0] < n_valid:
            state.scores = np.empty(k_layer.shape[0], np.float32)
        kv_bytes = 2 * 4 * n_valid * self.layout.n_kv_heads * c.head_dim
        plan = fused_layer.attention_plan(self.layout.n_heads, n_valid, kv_bytes, work, n_threads)
        return (k_layer, v_layer, pos % cache.ring_length(li), n_valid, self.kv_map, plan,
                fused_layer.inline_bytes(n_threads))

    def decode_layer(self, li: int, state: InferenceState, work=None) -> bool:
        """decode_attention then decode_mlp as one compiled call (fused_layer.layer_block);
        False (nothing run) where a block is not fusable."""
        attention, mlp = self.fused_blocks(work)[li]
        if attention is None or mlp is None:
            return False
        c, layer = self.config, self.layers[li]
        cache_args = self._attention_args(li, state, work)  # first: it may grow state.scores
        fused_layer.run_counted(
            fused_layer.layer_block, state.x, state.h, state.q, state.k, state.v, state.att,
            state.o, state.scores, state.gate, state.up, layer.attn_norm, layer.ffn_norm,
            c.norm_eps, *attention, *mlp, *self._norm_args(li),
            *self.rope_at(state.pos, c.layer_rope(li)), c.rope_interleaved,
            *cache_args)
        return True

    def _norm_args(self, li: int) -> tuple[tuple, tuple]:
        """Layer li's (qk, post) arguments of the compiled blocks, made once per model:
        qk = fused.qk_norm_and_scale's (q_norm, k_norm, eps, query_factor), post = (attention
        post-norm, MLP post-norm, GeGLU or not); the norms empty where the model has none."""
        if self._block_norms is None:
            c, none = self.config, fused_layer.NO_BIAS  # an empty float32 vector
            pick = lambda w: none if w is None else w  # noqa: E731
            self._block_norms = [
                ((pick(layer.attn_q_norm), pick(layer.attn_k_norm), float(c.norm_eps), float(c.query_factor)),
                 (pick(layer.post_attention_norm), pick(layer.post_ffw_norm), c.activation == "gelu_tanh"))
                for layer in self.layers]
        return self._block_norms[li]

    def decode_attention(self, li: int, state: InferenceState, work=None):
        """x += attention block of layer li for the token at state.pos (one token, in place),
        kernel by kernel: each product, and attention over heads, cut into tasks by `work`
        (debug mode, MoE layers, the seed's ParallelAttention; decode_layer runs the rest)."""
        c, layer, x, h = self.config, self.layers[li], state.x, state.h
        fused.rmsnorm_into(x, layer.attn_norm, c.norm_eps, h)
        layer.attn_q.matvec_into(h, state.q.reshape(-1), work)
        layer.attn_k.matvec_into(h, state.k, work)
        layer.attn_v.matvec_into(h, state.v, work)
        kv_shape = (self.layout.n_kv_heads, c.head_dim)
        q, k = state.q, state.k.reshape(kv_shape)
        fused.qk_norm_and_scale(q, k, *self._norm_args(li)[0])  # as the compiled layer does
        self._attend_one(li, state, state.pos, q, k, state.v.reshape(kv_shape), state.att, work)
        layer.attn_output.matvec_into(state.att.reshape(-1), state.o, work)
        if layer.post_attention_norm is not None:
            fused.rmsnorm_into(state.o, layer.post_attention_norm, c.norm_eps, state.o)
        fused.add_into(x, state.o)

    def decode_mlp(self, li: int, state: InferenceState, work=None):
        """x += the MLP block of layer li (one token, in place), kernel by kernel, as
        decode_attention."""
        layer, x, h = self.layers[li], state.x, state.h
        fused.rmsnorm_into(x, layer.ffn_norm, self.config.norm_eps, h)
        if layer.moe is not None:
            state.o[:] = layer.moe(h[None], True, work)[0]
        else:
            layer.ffn_gate.matvec_into(h, state.gate, work)
            layer.ffn_up.matvec_into(h, state.up, work)
            gelu = self.config.activation == "gelu_tanh"
            fused.glu_rows(state.gate, state.up, state.gate, 0, state.gate.shape[0], gelu)  # as the compiled layer
            layer.ffn_down.matvec_into(state.gate, state.o, work)
        if layer.post_ffw_norm is not None:
            fused.rmsnorm_into(state.o, layer.post_ffw_norm, self.config.norm_eps, state.o)
        fused.add_into(x, state.o)

    def decode_logits(self, state: InferenceState, work=None) -> np.ndarray:
        fused.rmsnorm_into(state.x, self.output_norm, self.config.norm_eps, state.h)
        logits = self.output.matvec_into(state.h, state.logits, work)
        softcap(logits, self.config.final_logit_softcap)
        return logits

    def embed_into(self, token: int, out: np.ndarray) -> np.ndarray:
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        out[:] = self._embedding_row(token)
        if self.config.embedding_scale != 1.0:
            out *= np.float32(self.config.embedding_scale)
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

    def hidden_states(self, state: InferenceState, tokens, chunk_size: int = 256) -> np.ndarray:
        """(T, hidden): each token's last hidden state after the final norm, what the LM head
        would read (embeddings pool them). Runs like prefill, from state.pos."""
        tokens, out = [int(t) for t in tokens], []
        with gemm.single_threaded_blas():
            for i in range(0, len(tokens), chunk_size):
                sp = Span(state, tokens[i:i + chunk_size], state.pos)
                state.cache.check_fits(sp.start + len(sp.tokens))
                x = self.run_layers([sp], self.embed(sp.tokens), 0, len(self.layers), fast=True)
                state.cache.advance(sp.start + len(sp.tokens))
                out.append(ops.rmsnorm(x, self.output_norm, self.config.norm_eps))
        return np.concatenate(out)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (transformers' gelu_pytorch_tanh): GeGLU's activation."""
    x = np.asarray(x, np.float32)
    inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def softcap(logits: np.ndarray, cap: float | None) -> None:
    """logits = cap * tanh(logits / cap), in place (Gemma's final_logit_softcapping)."""
    if cap is not None:
        np.multiply(np.tanh(logits / np.float32(cap)), np.float32(cap), out=logits)


def check_finite(x: np.ndarray, where: str) -> None:
    """debug=True's check: one line naming where activations first stopped being finite."""
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise TorchlessError(f"debug: {bad} non-finite activation(s) after {where}")
