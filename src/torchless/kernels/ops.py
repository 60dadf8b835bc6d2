"""Small pure NumPy functions of the decoder: the reference every faster kernel is checked against."""

from __future__ import annotations

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., dim) -> (..., dim); statistics in float32 as transformers does for float32 models."""
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives the right limit, -0
        return x / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray,
                attention_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (len(positions), head_dim // 2): the angle of each rotary pair.

    inv_freq: (head_dim // 2,) the angle per position of each pair (ModelConfig.rope_inv_freq,
    RoPE scaling included); attention_factor multiplies both (YaRN's magnitude correction)."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    return ((np.cos(angles) * attention_factor).astype(np.float32),
            (np.sin(angles) * attention_factor).astype(np.float32))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """x: (T, n_heads, head_dim), cos/sin: (T, head_dim // 2). Returns the rotated copy.

    interleaved: pairs are (2i, 2i+1), the layout of GGUF llama files.
    otherwise:   pairs are (i, i + head_dim/2), the rotate-half layout of Hugging Face files.
    """
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = b * c + a * s
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
              kv_map: np.ndarray | None = None) -> np.ndarray:
    """Grouped-query attention.

    q: (T, n_heads, head_dim); k, v: (S, n_kv_heads, head_dim); mask: (T, S) bool, True = may
    attend; kv_map: (n_heads,) the KV head of each query head (default: equal groups in order).
    Returns (T, n_heads, head_dim).
    """
    n_heads, head_dim = q.shape[1], q.shape[2]
    if kv_map is None:
        kv_map = np.arange(n_heads) // (n_heads // k.shape[1])
    kh = k[:, kv_map].transpose(1, 2, 0)  # (n_heads, hd, S)
    vh = v[:, kv_map].transpose(1, 0, 2)  # (n_heads, S, hd)
    scores = (q.transpose(1, 0, 2) @ kh) / np.float32(np.sqrt(head_dim))  # (n_heads, T, S)
    scores = np.where(mask[None], scores, np.float32(-np.inf))
    return (softmax(scores, axis=-1) @ vh).transpose(1, 0, 2)
