"""The decode attention kernel (fused.attend_heads) against a float64 NumPy softmax attention:
GQA head maps, head ranges, lengths around its 4-position blocks, and scores spread far enough
that softmax weights underflow; and its exp against float64 exp."""

from __future__ import annotations

import numpy as np
import pytest

from torchless.kernels import fused


def reference(q, k, v, n, kv_map):
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k[:n], v[:n]))
    s = np.einsum("hd,phd->hp", q64 / np.sqrt(q.shape[1]), k64[:, kv_map])
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("hp,phd->hd", p, v64[:, kv_map])


@pytest.mark.parametrize("n_valid", [1, 2, 3, 4, 5, 7, 8, 17, 300])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 80)])
def test_attend_heads_matches_float64(n_valid, heads, kv_heads, head_dim):
    rng = np.random.default_rng(n_valid * 31 + heads)
    q = (rng.standard_normal((heads, head_dim)) * 4).astype(np.float32)  # peaked softmax too
    k = rng.standard_normal((320, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((320, kv_heads, head_dim)).astype(np.float32)
    kv_map = np.repeat(np.arange(kv_heads), heads // kv_heads).astype(np.int64)
    out = np.full((heads, head_dim), np.nan, np.float32)
    scores = np.empty(320, np.float32)
    fused.attend_heads(q, k, v, n_valid, kv_map, out, 0, heads, scores)
    np.testing.assert_allclose(out, reference(q, k, v, n_valid, kv_map), rtol=0, atol=2e-5)
    # a head range writes only its heads
    part = np.full_like(out, np.nan)
    fused.attend_heads(q, k, v, n_valid, kv_map, part, 1, heads - 1, scores)
    assert np.isnan(part[0]).all() and np.isnan(part[-1]).all()
    np.testing.assert_array_equal(part[1:-1], out[1:-1])


def test_softmax_weights_exp_is_float32_accurate():
    x = np.concatenate([np.linspace(-100.0, 0.0, 400_001), [0.0, -1e-30, -87.0, -86.9]]).astype(np.float32)
    scores = x.copy()
    bits = np.empty(x.size, np.int32)
    total = fused._softmax_weights(scores, x.size, np.float32(0.0), bits)
    exact = np.exp(x.astype(np.float64))
    normal = x >= -87.0
    rel = np.abs(scores[normal] - exact[normal]) / exact[normal]
    assert rel.max() < 2e-7, rel.max()
    assert np.all(scores[~normal] <= 2e-38)  # clamped where float32 exp would be subnormal
    np.testing.assert_allclose(total, exact.sum(), rtol=1e-5)
    # a shift by the maximum, as attention does: the largest weight is exactly 1
    scores = (x + np.float32(5.0)).copy()
    fused._softmax_weights(scores, x.size, np.float32(5.0), bits)
    assert scores[np.argmax(x)] == 1.0


@pytest.mark.parametrize("gelu", [False, True])
def test_glu_rows_match_float64_silu_and_tanh_gelu(gelu):
    """fused.glu_rows (its exp vectorized, GELU written as g sigmoid(2z)) against float64 SiLU and
    transformers' tanh GELU, over the whole float32 range that matters and past its clamps."""
    x = np.concatenate([np.linspace(-120.0, 120.0, 200_001), [0.0, -1e-30, 87.0, -87.0, 88.5, -88.5],
                        np.random.default_rng(0).standard_normal(50_000) * 6]).astype(np.float32)
    up = np.random.default_rng(1).uniform(-2, 2, x.size).astype(np.float32)
    out = np.full(x.size + 7, np.nan, np.float32)
    fused.glu_rows(np.r_[np.zeros(3, np.float32), x], np.r_[np.zeros(3, np.float32), up], out, 3, 3 + x.size, gelu)
    g = x.astype(np.float64)
    act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) if gelu else g / (1 + np.exp(-g))
    exact = act * up
    # (absolute: far left GELU is ~1e-12, where float32 tanh gives exactly 0)
    np.testing.assert_allclose(out[3:3 + x.size], exact, rtol=2e-6, atol=1e-9)
    assert np.isnan(out[:3]).all() and np.isnan(out[3 + x.size:]).all()  # only lo..hi written


@pytest.mark.parametrize("n_before, T", [(0, 1), (0, 2), (0, 7), (0, 64), (5, 1), (13, 30), (290, 9)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 1, 80)])
def test_causal_rows_match_the_reference_attention(n_before, T, heads, kv_heads, head_dim):
    """A prompt chunk of T rows after n_before cached positions: every row t equals ops.attention
    with its causal mask (keys 0 .. n_before + t), whichever thread ran it."""
    from torchless.kernels import ops

    rng = np.random.default_rng(n_before * 7 + T)
    q = (rng.standard_normal((T, heads, head_dim)) * 3).astype(np.float32)
    k = rng.standard_normal((320, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((320, kv_heads, head_dim)).astype(np.float32)
    kv_map = np.repeat(np.arange(kv_heads), heads // kv_heads).astype(np.int64)
    out = np.full_like(q, np.nan)
    fused.attend_causal_rows(q, k, v, n_before, kv_map, out)
    S = n_before + T
    positions = np.arange(n_before, S)
    mask = np.arange(S)[None, :] <= positions[:, None]
    np.testing.assert_allclose(out, ops.attention(q, k[:S], v[:S], mask, kv_map), rtol=0, atol=2e-5)
    for t in range(T):  # and each row is the one-query kernel's answer, bit for bit
        row = np.empty((heads, head_dim), np.float32)
        fused.attend_heads(q[t], k, v, n_before + t + 1, kv_map, row, 0, heads, np.empty(320, np.float32))
        np.testing.assert_array_equal(out[t], row)
