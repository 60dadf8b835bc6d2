"""Prefill products: a prompt chunk's matrix-matrix products through BLAS.

Past ~16 tokens a product is compute-bound, and an sgemm on float32 weights beats the quantized
kernels; expanding a weight to float32 costs one pass over it per chunk of tokens. The rows of
the output are split over Python threads, each expanding its slice of the weight (a nogil numba
kernel) and running a single-threaded sgemm on it. BLAS's own thread pool stays at one thread:
its threads spin after each call, and on a small machine they would fight numba's for the cores.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .qmatmul import TILE, PackedWeight, dequantize_transposed_into

# Below this many rows the quantized kernel beats BLAS (which expands the weights to float32 per
# call): on SmolLM2 at 2 threads it won clearly at 16 and 32 rows and by 0-13% at 64
# (benchmarks/bench_batch_kernel.py). Prefill chunks of 256 go to BLAS.
MIN_TOKENS_FOR_BLAS = 64

_pool: ThreadPoolExecutor | None = None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchless-gemm")
    return _pool


@contextlib.contextmanager
def single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it BLAS keeps its own threads: slower, still correct
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


_scratch = threading.local()


def _buffer(name: str, n: int) -> np.ndarray:
    """A float32 buffer of at least n elements, kept per thread and grown, never freed: fresh
    allocations in worker threads land in per-thread malloc arenas that keep their pages."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), np.float32)
        setattr(_scratch, name, buf)
    return buf[:n]


def _part(w: PackedWeight, X: np.ndarray, out: np.ndarray, r0: int, r1: int):
    cols, n = w.shape[1], r1 - r0
    wt = _buffer("weights", cols * n).reshape(cols, n)
    dequantize_transposed_into(w, wt, r0, r1)
    result = _buffer("result", X.shape[0] * n).reshape(X.shape[0], n)
    np.matmul(X, wt, out=result)
    out[:, r0:r1] = result


def matmul_blas_into(w: PackedWeight, X: np.ndarray, out: np.ndarray, n_threads: int) -> np.ndarray:
    """out (M, rows) = X (M, cols) @ W.T, rows split over `n_threads` threads."""
    rows = w.shape[0]
    tiles = -(-rows // TILE)
    n = max(1, min(n_threads, tiles))
    bounds = [min(rows, (i * tiles // n) * TILE) for i in range(n + 1)]
    futures = [_executor(n).submit(_part, w, X, out, bounds[i], bounds[i + 1]) for i in range(1, n)]
    _part(w, X, out, bounds[0], bounds[1])
    for f in futures:
        f.result()
    return out
