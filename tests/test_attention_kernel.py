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
