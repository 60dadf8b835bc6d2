"""Compiled versions of the decoder's small operations, for the one-token decode path (and the
attention of a prompt chunk, row by row through the same kernel).

Each is a handful of NumPy calls in `ops`; at one token those calls cost more in interpreter
overhead than in arithmetic, so here they are loops that write into preallocated buffers.
`ops` stays the reference these are tested against.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_FM = {"contract"}
# Attention's dot products over head_dim are sums: without reassociation LLVM must add the 64
# products one after another (a 4-cycle dependency each) and cannot use vector lanes at all.
# Allowing it here (with a local accumulator) made this kernel 2.6x faster on SmolLM2's shape at
# 300 cached positions, one core, old and new interleaved in one script (benchmarks/
# bench_attention.py times it alone); the order of the additions is still fixed per build.
_FM_SUM = {"contract", "reassoc"}


@njit(nogil=True, cache=True, fastmath=_FM)
def rmsnorm_into(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight; x, weight, out: (dim,)"""
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * inv * weight[i]


@njit(nogil=True, cache=True, fastmath=_FM)
def add_into(x, y):
    for i in range(x.shape[0]):
        x[i] += y[i]


@njit(nogil=True, cache=True, fastmath=_FM)
def add_bias(x, bias):
    for i in range(x.shape[0]):
        x[i] += bias[i]


# exp(x) = 2^k e^r, k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts, Cody-Waite), e^r by
# Cephes' expf polynomial: within 1e-7 relative of exp on [-87, 0]. Written out (rather than
# np.exp, a libm call per element) so that it vectorizes: it was a fifth of attention's time.
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
             np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def exp_parts(x, bits, i):
    """exp(x) = the returned e^r times 2^k, whose float32 bits go to bits[i] (view bits as
    float32 to multiply, in a second loop: LLVM vectorizes neither a bit cast of a scalar nor
    ldexp). x is clamped to [-87, 88], where both factors are normal floats: past it, exp is
    under or over float32's normal range anyway (clamped by conditional expressions: with
    min and max the loops calling this stayed scalar)."""
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    x = np.float32(-87.0) if x < np.float32(-87.0) else x
    x = np.float32(88.0) if x > np.float32(88.0) else x
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    y = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    bits[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
    return y * r * r + r + np.float32(1.0)


_GELU_C = np.float32(0.7978845608028654)  # sqrt(2 / pi)


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def glu_rows(gate, up, out, lo, hi, gelu):
    """out[lo:hi] = act(gate[lo:hi]) * up[lo:hi]: act SiLU (SwiGLU), g sigmoid(g), or with gelu
    the tanh approximation of GELU (GeGLU: Gemma) that transformers' gelu_pytorch_tanh computes,
    0.5 g (1 + tanh(z)) with z = sqrt(2/pi) (g + 0.044715 g^3), written as g sigmoid(2z) (the
    same function). Both through exp_parts, and written so that LLVM vectorizes the loops:
    numpy's error model (numba's default checks each division for zero, a branch per
    element) and slices indexed from 0 (an index lo + i may be negative to numba, which then
    wraps it, also a branch). With a libm exp per element and those branches, SiLU over a
    micro-batch of 16 rows took 123 us of a SmolLM2 layer's ~1,000 on one core; vectorized,
    1536 elements take ~1 us (scratch timings)."""
    n = hi - lo
    g, u, o = gate[lo:hi], up[lo:hi], out[lo:hi]
    e = np.empty(n, np.float32)
    bits = np.empty(n, np.int32)
    for i in range(n):
        z = g[i]
        if gelu:
            z = np.float32(2.0) * _GELU_C * (z + np.float32(0.044715) * z * z * z)
        e[i] = exp_parts(-z, bits, i)
    two_k = bits.view(np.float32)
    for i in range(n):
        o[i] = g[i] / (np.float32(1.0) + e[i] * two_k[i]) * u[i]


@njit(nogil=True, cache=True)
def glu_matrix(gate, up, gelu):
    """gate (T, n) = act(gate) * up, row by row in place (glu_rows): a prompt chunk's MLP with no
    temporaries the size of gate. As NumPy expressions, SiLU and the product kept four of them
    (1.5 MB each for SmolLM2's 256-token chunk), the peak of a prefill's memory."""
    for m in range(gate.shape[0]):
        glu_rows(gate[m], up[m], gate[m], 0, gate.shape[1], gelu)


@njit(nogil=True, cache=True)
def post_norm(o, norm, eps):
    """o = rmsnorm(o) * norm in place where the block has a post-norm (Gemma 3; norm empty:
    none), before the residual add."""
    if norm.shape[0] > 0:
        rmsnorm_into(o, norm, eps, o)


@njit(nogil=True, cache=True, fastmath=_FM)
def rope_rows(v, cos, sin, interleaved):
    """Rotate each row of v: (n_heads, head_dim) in place; cos, sin: (head_dim // 2,)."""
    half = v.shape[1] // 2
    for h in range(v.shape[0]):
        for i in range(half):
            if interleaved:
                a, b = v[h, 2 * i], v[h, 2 * i + 1]
                v[h, 2 * i] = a * cos[i] - b * sin[i]
                v[h, 2 * i + 1] = b * cos[i] + a * sin[i]
            else:
                a, b = v[h, i], v[h, i + half]
                v[h, i] = a * cos[i] - b * sin[i]
                v[h, i + half] = b * cos[i] + a * sin[i]


@njit(nogil=True, cache=True)
def qk_norm_and_scale(q, k, q_norm, k_norm, eps, query_factor):
    """Before RoPE, in place: each head of q (n_heads, head_dim) and k (n_kv_heads, head_dim)
    RMS-normed where the model has per-head norms (Qwen3, Gemma 3; q_norm empty: none), and q
    scaled by query_factor (so that attention's 1 / sqrt(head_dim) gives the model's scale)."""
    if q_norm.shape[0] > 0:
        for h in range(q.shape[0]):
            rmsnorm_into(q[h], q_norm, eps, q[h])
        for h in range(k.shape[0]):
            rmsnorm_into(k[h], k_norm, eps, k[h])
    if query_factor != 1.0:
        f = np.float32(query_factor)
        for h in range(q.shape[0]):
            for i in range(q.shape[1]):
                q[h, i] *= f


@njit(nogil=True, cache=True)
def rope_and_store(q, k, v, qk, cos, sin, interleaved, k_layer, v_layer, slot):
    """qk_norm_and_scale (qk: its (q_norm, k_norm, eps, query_factor)), then RoPE on q
    (n_heads, head_dim) and k (n_kv_heads, head_dim) in place; k, v into the cache's slot."""
    qk_norm_and_scale(q, k, qk[0], qk[1], qk[2], qk[3])
    rope_rows(q, cos, sin, interleaved)
    rope_rows(k, cos, sin, interleaved)
    k_layer[slot] = k
    v_layer[slot] = v


@njit(nogil=True, cache=True, fastmath=_FM_SUM)
def _softmax_weights(scores, n, m, bits):
    """scores[p] = exp(scores[p] - m) for p < n (m: their maximum); returns their sum. bits:
    int32 scratch (>= n) for the 2^k factors, built in the exponent field."""
    for p in range(n):
        scores[p] = exp_parts(scores[p] - m, bits, p)
    two_k = bits.view(np.float32)
    total = np.float32(0.0)
    for p in range(n):
        e = scores[p] * two_k[p]
        scores[p] = e
        total += e
    return total


@njit(nogil=True, cache=True, fastmath=_FM_SUM)
def attend_heads(q, k_cache, v_cache, n_valid, kv_map, out, h0, h1, scores):
    """Single-query attention for heads h0..h1 over the first n_valid cache slots.

    q, out: (n_heads, head_dim); k_cache, v_cache: (cache_len, n_kv_heads, head_dim);
    kv_map[h]: the KV head of query head h; scores: (>= n_valid,) scratch. The slots' order
    does not matter to softmax, so a ring buffer needs no reordering. Positions go 4 at a time:
    four independent dot products, and one pass over the weighted sum per 4 value rows (one
    at a time, the sum's loads and stores were the chain; 1.5x in all).
    """
    hd = q.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    acc = np.empty(hd, np.float32)  # local, so the weighted sum is not reloaded from `out`
    qs = np.empty(hd, np.float32)
    bits = np.empty(n_valid, np.int32)
    p4 = n_valid - n_valid % 4
    for h in range(h0, h1):
        kvh = kv_map[h]
        for d in range(hd):
            qs[d] = q[h, d] * scale
        m = np.float32(-np.inf)
        for p in range(0, p4, 4):
            s0 = np.float32(0.0); s1 = np.float32(0.0); s2 = np.float32(0.0); s3 = np.float32(0.0)
            for d in range(hd):
                s0 += qs[d] * k_cache[p, kvh, d]
                s1 += qs[d] * k_cache[p + 1, kvh, d]
                s2 += qs[d] * k_cache[p + 2, kvh, d]
                s3 += qs[d] * k_cache[p + 3, kvh, d]
            scores[p] = s0; scores[p + 1] = s1; scores[p + 2] = s2; scores[p + 3] = s3
            m = max(m, max(max(s0, s1), max(s2, s3)))
        for p in range(p4, n_valid):
            s = np.float32(0.0)
            for d in range(hd):
                s += qs[d] * k_cache[p, kvh, d]
            scores[p] = s
            m = max(m, s)
        total = _softmax_weights(scores, n_valid, m, bits)
        acc[:] = 0.0
        for p in range(0, p4, 4):
            w0 = scores[p]; w1 = scores[p + 1]; w2 = scores[p + 2]; w3 = scores[p + 3]
            for d in range(hd):
                acc[d] += ((w0 * v_cache[p, kvh, d] + w1 * v_cache[p + 1, kvh, d])
                           + (w2 * v_cache[p + 2, kvh, d] + w3 * v_cache[p + 3, kvh, d]))
        for p in range(p4, n_valid):
            w = scores[p]
            for d in range(hd):
                acc[d] += w * v_cache[p, kvh, d]
        inv = np.float32(1.0) / total
        for d in range(hd):
            out[h, d] = acc[d] * inv


@njit(nogil=True, cache=True, parallel=True, fastmath=_FM_SUM)
def attend_causal_rows(q, k_cache, v_cache, n_before, kv_map, out):
    """A prompt chunk's attention: row t of q (T, n_heads, head_dim) attends the first
    n_before + t + 1 slots of the caches, which hold positions 0.. in order (the chunk's own keys
    written, no ring wrapped), through attend_heads. Rows go over numba's threads in pairs t, T-1-t,
    so that every thread's share of the causal triangle is the same size."""
    T, n_heads = q.shape[0], q.shape[1]
    for i in prange(T):
        t = i // 2 if i % 2 == 0 else T - 1 - i // 2
        n_valid = n_before + t + 1
        attend_heads(q[t], k_cache, v_cache, n_valid, kv_map, out[t], 0, n_heads,
                     np.empty(n_valid, np.float32))
