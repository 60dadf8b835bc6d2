"""Compiled versions of the decoder's small operations, for the one-token decode path.

Each is a handful of NumPy calls in `ops`; at one token those calls cost more in interpreter
overhead than in arithmetic, so here they are loops that write into preallocated buffers.
`ops` stays the reference these are tested against.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

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


@njit(nogil=True, cache=True, fastmath=_FM)
def swiglu_into(gate, up, out):
    """out = silu(gate) * up"""
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + np.exp(-g)) * up[i]


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


@njit(nogil=True, cache=True, fastmath=_FM_SUM)
def attend_heads(q, k_cache, v_cache, n_valid, kv_map, out, h0, h1, scores):
    """Single-query attention for heads h0..h1 over the first n_valid cache slots.

    q, out: (n_heads, head_dim); k_cache, v_cache: (cache_len, n_kv_heads, head_dim);
    kv_map[h]: the KV head of query head h; scores: (>= n_valid,) scratch. The slots' order
    does not matter to softmax, so a ring buffer needs no reordering.
    """
    hd = q.shape[1]
    scale = np.float32(1.0 / math.sqrt(hd))
    acc = np.empty(hd, np.float32)  # local, so the weighted sum is not reloaded from `out`
    qs = np.empty(hd, np.float32)
    for h in range(h0, h1):
        kvh = kv_map[h]
        for d in range(hd):
            qs[d] = q[h, d] * scale
        m = np.float32(-np.inf)
        for p in range(n_valid):
            s = np.float32(0.0)
            for d in range(hd):
                s += qs[d] * k_cache[p, kvh, d]
            scores[p] = s
            m = max(m, s)
        total = np.float32(0.0)
        for p in range(n_valid):
            e = np.exp(scores[p] - m)
            scores[p] = e
            total += e
        acc[:] = 0.0
        for p in range(n_valid):
            w = scores[p]
            for d in range(hd):
                acc[d] += w * v_cache[p, kvh, d]
        inv = np.float32(1.0) / total
        for d in range(hd):
            out[h, d] = acc[d] * inv
