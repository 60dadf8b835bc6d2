"""A decoder layer as one compiled call for one token of one sequence (`layer_block`: the
attention block, i.e. rmsnorm, Q/K/V products, per-head q/k norms where the model has them
(Qwen3, Gemma 3), RoPE, the KV cache write (a windowed layer's own ring), GQA attention, output
product, post-norm (Gemma 3), residual add; then the gated MLP block, SwiGLU or GeGLU), and each
block as one compiled call for a micro-batch: rows that are tokens of different sequences, decode
steps and prompt chunks alike (Mistral._fusable says which micro-batches can).

Why: run as separate kernels a decode step is ~200 Python-level calls per token, and between
them the calling thread holds the GIL, so pipeline stage threads and the server's engine thread
serialize on it. A layer or block here is one `nogil` call; the GIL is taken only between them.

A layer whose work is over the inline threshold runs as one parallel region (`phases`): its
products and attention are the phases of one team of workers, each product cut into tasks by
the plan `adaptive` makes for it. Under the threshold it runs on the calling thread. A
micro-batch's products are the scheduler's batched task functions (`adaptive._batch_*tasks_*`),
one region each, or the serial kernels, exactly as `adaptive._matmul` chooses. Each call
returns the tasks it created and how many ran on their owner, so `GLOBAL_STATS` stays exact.

Each compiled call here is specialized on its weights' types, and compiling is slow: with an
empty kernel cache, a tiny Q4_0 model's first decode step took ~50 s, and the two blocks as
calls of their own (with their own parallel regions) ~25 s more. So for one token only the
layer is fused; a block on its own (debug mode, MoE layers, the seed's ParallelAttention and
ParallelMLP) runs kernel by kernel (Mistral.decode_attention / decode_mlp).

A product's weight is a tuple (codes, scale, min, group, bias, nbytes, bounds, owners, starts):
the packed arrays, a bias (empty: none), the bytes it reads, and its task plan. Its kind is told
apart by type at compile time: "q4" codes are uint8, "q8" int8, "f32" a 3-D float32 array.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import adaptive, phases, qmatmul, qmatmul_batch
from .fused import add_bias, add_into, attend_heads, glu_rows, post_norm, rmsnorm_into, rope_and_store

_FM = {"contract"}


def _kernels_of(codes_type):
    """(serial matvec, serial batch, batch tasks) of a weight's codes type."""
    kind = phases.kind_of(codes_type)
    return (qmatmul._KERNELS[kind][0], qmatmul_batch.FLOAT_TILES[kind], adaptive._BATCH_TASK_KERNELS[kind])


def _product(weight, x, out):
    """out = W x (+ bias) for one row x, on the calling thread."""


def _batch_product(weight, X, out, inline_bytes):
    """out = X W^T (+ bias) for every row of X; returns (tasks created, tasks local)."""


@overload(_product)
def _product_impl(weight, x, out):
    serial = _kernels_of(weight.types[0])[0]

    def impl(weight, x, out):
        codes, scale, mn, group, bias = weight[0], weight[1], weight[2], weight[3], weight[4]
        serial(codes, scale, mn, group, x, out, 0, out.shape[0])
        if bias.shape[0]:
            add_bias(out, bias)

    return impl


@overload(_batch_product)
def _batch_product_impl(weight, X, out, inline_bytes):
    _, serial, tasks = _kernels_of(weight.types[0])

    def impl(weight, X, out, inline_bytes):
        codes, scale, mn, group, bias, nbytes, bounds, owners, starts = weight
        created = local = 0
        if nbytes * X.shape[0] < inline_bytes:
            serial(codes, scale, mn, X, out, 0, codes.shape[0])
        else:
            local, _ = tasks(codes, scale, mn, group, X, out, bounds, owners, starts)
            created = bounds.shape[0] - 1
        if bias.shape[0]:
            for m in range(out.shape[0]):
                add_bias(out[m], bias)
        return created, local

    return impl


@njit(nogil=True, cache=True)
def _attention_serial(h, q, k, v, att, o, scores, wq, wk, wv, wo, qk, cos, sin, interleaved,
                      k_layer, v_layer, slot, n_valid, kv_map):
    _product(wq, h, q.reshape(-1))
    _product(wk, h, k)
    _product(wv, h, v)
    kv_shape = (k_layer.shape[1], k_layer.shape[2])
    rope_and_store(q, k.reshape(kv_shape), v.reshape(kv_shape), qk, cos, sin, interleaved,
                   k_layer, v_layer, slot)
    attend_heads(q, k_layer, v_layer, n_valid, kv_map, att, 0, q.shape[0], scores)
    _product(wo, att.reshape(-1), o)


@njit(nogil=True, cache=True)
def _mlp_serial(h, gate, up, o, w_gate, w_up, w_down, gelu):
    _product(w_gate, h, gate)
    _product(w_up, h, up)
    glu_rows(gate, up, gate, 0, gate.shape[0], gelu)
    _product(w_down, gate, o)


@njit(nogil=True, cache=True)
def _attention_work(wq, wk, wv, wo, k_layer, n_valid):
    """Bytes of weights and cache the attention block reads."""
    return wq[5] + wk[5] + wv[5] + wo[5] + 2 * k_layer[0].nbytes * n_valid


@njit(nogil=True, cache=True)
def layer_block(x, h, q, k, v, att, o, scores, gate, up, attn_norm, ffn_norm, eps, wq, wk, wv,
                wo, w_gate, w_up, w_down, qk, post, cos, sin, interleaved, k_layer, v_layer, slot,
                n_valid, kv_map, attention_plan, inline_bytes):
    """x += the attention block, then x += the MLP block, of one layer for one token. q,
    att: (n_heads, head_dim); k, v: (n_kv_heads * head_dim,); k_layer, v_layer: the layer's
    cache (slots, n_kv_heads, head_dim), grown to hold `slot`; attention_plan: (bounds, owners,
    starts) over heads, owners empty for attention too small to split; qk: the per-head norms
    and query factor (fused.qk_norm_and_scale); post: (the attention block's post-norm, the
    MLP's, GeGLU or not) (fused.post_norm, fused.glu_rows). Work (weight and cache
    bytes) under inline_bytes runs on this thread, the rest as one parallel region
    (`phases.layer_phases`). Returns (tasks created, tasks local)."""
    rmsnorm_into(x, attn_norm, eps, h)
    created = local = 0
    work = _attention_work(wq, wk, wv, wo, k_layer, n_valid) + w_gate[5] + w_up[5] + w_down[5]
    if work >= inline_bytes:
        created, local = phases.layer_phases(x, h, q, k, v, att, o, gate, up, ffn_norm, eps, wq,
                                             wk, wv, wo, w_gate, w_up, w_down, qk, post, cos, sin,
                                             interleaved, k_layer, v_layer, slot, n_valid, kv_map,
                                             attention_plan)
    else:
        _attention_serial(h, q, k, v, att, o, scores, wq, wk, wv, wo, qk, cos, sin, interleaved,
                          k_layer, v_layer, slot, n_valid, kv_map)
        post_norm(o, post[0], eps)
        add_into(x, o)
        rmsnorm_into(x, ffn_norm, eps, h)
        _mlp_serial(h, gate, up, o, w_gate, w_up, w_down, post[2])
    post_norm(o, post[1], eps)
    add_into(x, o)
    return created, local


# -- a micro-batch of B rows, each a token of some sequence at some position ---------------------

@njit(nogil=True, cache=True)
def _rmsnorm_rows(X, norm, eps):
    H = np.empty_like(X)
    for m in range(X.shape[0]):
        rmsnorm_into(X[m], norm, eps, H[m])
    return H


@njit(nogil=True, cache=True)
def _attend_units(Q, k_caches, v_caches, layer, n_valid, kv_map, ATT, u0, u1, scores):
    """Attention of the (row, head) units u0..u1 (unit = row * n_heads + head), one
    attend_heads call per row they touch: a call per unit allocated its scratch 144 times a
    layer for 16 rows of SmolLM2, a third of the attention's time."""
    n_heads = Q.shape[1]
    u = u0
    while u < u1:
        b, head = divmod(u, n_heads)
        end = min(u1, (b + 1) * n_heads)
        attend_heads(Q[b], k_caches[b][layer], v_caches[b][layer], n_valid[b], kv_map, ATT[b],
                     head, head + end - u, scores)
        u = end


@njit(nogil=True, cache=True, parallel=True)
def _batch_attention_tasks(Q, k_caches, v_caches, layer, n_valid, kv_map, ATT, bounds, owners,
                           starts):
    """The scheduler's claiming (as adaptive._attention_tasks) over (row, head) units."""
    runners = np.empty(owners.shape[0], np.int64)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        scores = np.empty(max(1, n_valid.max()), np.float32)
        i = adaptive._claim(counters, ends, w)
        while i >= 0:
            _attend_units(Q, k_caches, v_caches, layer, n_valid, kv_map, ATT, bounds[i], bounds[i + 1],
                          scores)
            runners[i] = w
            i = adaptive._claim(counters, ends, w)
    return adaptive._count_local(runners, owners), runners


@njit(nogil=True, cache=True)
def batch_attention_block(X, norm, eps, wq, wk, wv, wo, qk, post_norm_weight, cos, sin, interleaved,
                          k_caches, v_caches, layer, slots, n_valid, kv_map, attention_plan,
                          inline_bytes):
    """X (B, hidden) += the attention block of a layer, row b a token at the position whose
    RoPE is cos[b], sin[b] and whose cache slot is slots[b], attending the first n_valid[b] slots;
    k_caches[b], v_caches[b]: its sequence's caches (n, slots, n_kv_heads, head_dim) of the
    layer's kind (whole or windowed), the layer's at index `layer`, grown to hold its slot. Rows
    of one sequence (a prompt chunk) share its caches: every row's key and value is stored
    before any row attends, so each sees those of the rows before it.
    attention_plan: over the B * n_heads (row, head) units."""
    B = X.shape[0]
    n_kv_heads, head_dim = k_caches[0].shape[2], k_caches[0].shape[3]
    n_heads = kv_map.shape[0]
    H = _rmsnorm_rows(X, norm, eps)
    Q = np.empty((B, n_heads, head_dim), np.float32)
    K = np.empty((B, n_kv_heads, head_dim), np.float32)
    V = np.empty((B, n_kv_heads, head_dim), np.float32)
    c1, l1 = _batch_product(wq, H, Q.reshape(B, -1), inline_bytes)
    c2, l2 = _batch_product(wk, H, K.reshape(B, -1), inline_bytes)
    c3, l3 = _batch_product(wv, H, V.reshape(B, -1), inline_bytes)
    for b in range(B):
        rope_and_store(Q[b], K[b], V[b], qk, cos[b], sin[b], interleaved, k_caches[b][layer],
                       v_caches[b][layer], slots[b])
    ATT = np.empty_like(Q)
    bounds, owners, starts = attention_plan
    c4 = l4 = 0
    if owners.shape[0] == 0:
        scores = np.empty(max(1, n_valid.max()), np.float32)
        _attend_units(Q, k_caches, v_caches, layer, n_valid, kv_map, ATT, 0, B * n_heads, scores)
    else:
        l4, _ = _batch_attention_tasks(Q, k_caches, v_caches, layer, n_valid, kv_map, ATT,
                                       bounds, owners, starts)
        c4 = bounds.shape[0] - 1
    O = np.empty_like(X)
    c5, l5 = _batch_product(wo, ATT.reshape(B, -1), O, inline_bytes)
    for b in range(B):
        post_norm(O[b], post_norm_weight, eps)
    X += O
    return c1 + c2 + c3 + c4 + c5, l1 + l2 + l3 + l4 + l5


@njit(nogil=True, cache=True)
def batch_mlp_block(X, norm, eps, w_gate, w_up, w_down, post, intermediate, inline_bytes):
    """X (B, hidden) += the MLP block of one layer (post: as layer_block's), every product once
    for all B rows."""
    B = X.shape[0]
    H = _rmsnorm_rows(X, norm, eps)
    gate = np.empty((B, intermediate), np.float32)
    up = np.empty_like(gate)
    c1, l1 = _batch_product(w_gate, H, gate, inline_bytes)
    c2, l2 = _batch_product(w_up, H, up, inline_bytes)
    for m in range(B):
        glu_rows(gate[m], up[m], gate[m], 0, intermediate, post[2])
    O = np.empty_like(X)
    c3, l3 = _batch_product(w_down, gate, O, inline_bytes)
    for m in range(B):
        post_norm(O[m], post[1], eps)
    X += O
    return c1 + c2 + c3, l1 + l2 + l3


# -- what the blocks are called with ------------------------------------------------------------

NO_BIAS = np.zeros(0, np.float32)
_NO_TASKS = np.zeros(0, np.int64)
SERIAL_PLAN = (_NO_TASKS, _NO_TASKS, _NO_TASKS)  # owners empty: run on the calling thread


def inline_bytes(n_threads: int) -> int:
    """Work (bytes of weights or cache read) under which a product or attention runs on the
    calling thread, as adaptive._matvec decides; everything does at one thread."""
    return 2**62 if n_threads == 1 else adaptive.inline_threshold_bytes()


def weight_args(linear, work, n_threads: int) -> tuple:
    """A Linear's weight tuple for the blocks (see the module docstring)."""
    packed = linear.packed
    bias = NO_BIAS if linear.bias is None else np.ascontiguousarray(linear.bias, np.float32)
    plan = adaptive._matmul_plan(packed.rows, packed.cols, work, n_threads)
    return (packed.codes, packed.scale, packed.min, packed.group, bias, packed.nbytes,
            plan.bounds, plan.owners, plan.starts)


def attention_plan(units: int, seq_len: int, work_bytes: int, work, n_threads: int) -> tuple:
    """(bounds, owners, starts) over `units` (heads, or (sequence, head) pairs) as
    adaptive.attention_parallel_adaptive plans them; SERIAL_PLAN for small work."""
    if work_bytes < inline_bytes(n_threads):
        return SERIAL_PLAN
    # keyed on what the default config depends on, so that a step builds no config (that cost
    # ~10 us a layer, per token)
    per_task = None if work else adaptive.WorkDistributionConfig.attention_units_per_task(units, seq_len)
    config = lambda: work or adaptive.WorkDistributionConfig.for_attention(units, seq_len)  # noqa: E731
    plan = adaptive.cached_plan(("attention", units, per_task, work, n_threads),
                                lambda: adaptive.TaskPlan(units, config(), n_threads, align=1))
    return plan.bounds, plan.owners, plan.starts


def run_counted(block, *args) -> None:
    """Call a block with numba's chunk size at one (each worker its own chunk, as the scheduler
    wants: see adaptive._matvec) and count its tasks in GLOBAL_STATS."""
    previous = adaptive._set_chunksize(1)
    try:
        created, local = block(*args)
    finally:
        adaptive._set_chunksize(previous)
    if created:
        adaptive.GLOBAL_STATS.record_counts(created, local)
