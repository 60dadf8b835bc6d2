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
from numba import njit

from .qmatmul import TILE, PackedWeight, _dq_tile_f32, _dq_tile_q4, _dq_tile_q8

# Below this many rows the batched kernels beat BLAS (which expands the weights to float32 per
# call, then runs sgemm). With the float batched kernels (kernels/float_tiles) they do at every
# chunk size measured: one core, SmolLM2's shapes at 64, 128 and 256 rows 1.35-2.1x
# (`python benchmarks/bench_batch_kernel.py --m 64,128,256 --blas`), a 4096 x 4096 and a
# 4096 x 14336 Q4_1 weight at 64 and 256 rows 1.55-2.5x (the same with `--m 64,256
# --shapes Q4_1:4096x4096,Q4_1:4096x14336`); a whole 256-token SmolLM2 prefill
# (`torchless bench -p 256`) 1.2-1.45x at 1 thread and 1.25-1.3x at 2. Prompt chunks are 256
# tokens by default, so BLAS runs only for chunks made longer than this (not measured).
MIN_TOKENS_FOR_BLAS = 1024


# Transposed dequantization, for prefill through BLAS: a long prompt's products are
# compute-bound, and an sgemm on float32 weights beats any kernel here once the weights are
# expanded; expanding them costs one pass over the weights per chunk of prompt tokens.

@njit(nogil=True, cache=True)
def _dqt_q4(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[0], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_q4(codes, scale, mn, t, wt)
        _scatter_tile(wt, t, r0, r1, out)


@njit(nogil=True, cache=True)
def _dqt_q8(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[0], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_q8(codes, scale, mn, t, wt)
        _scatter_tile(wt, t, r0, r1, out)


@njit(nogil=True, cache=True)
def _dqt_f32(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[0], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_f32(codes, scale, mn, t, wt)
        _scatter_tile(wt, t, r0, r1, out)


@njit(nogil=True, cache=True)
def _scatter_tile(wt, t, r0, r1, out):
    """Rows [r0, r1) of tile t, as columns of out (cols, r1 - r0)."""
    lo, hi = max(r0, t * TILE), min(r1, t * TILE + TILE)
    for c in range(out.shape[0]):
        for r in range(lo, hi):
            out[c, r - r0] = wt[c, r - t * TILE]


_DQT = {"q4": _dqt_q4, "q8": _dqt_q8, "f32": _dqt_f32}


def dequantize_transposed_into(w: "PackedWeight", out: np.ndarray, start: int = 0,
                               stop: int | None = None) -> np.ndarray:
    """out (cols, stop - start) = W[start:stop].T in float32, on the calling thread (GIL released)."""
    stop = w.shape[0] if stop is None else stop
    if not 0 <= start <= stop <= w.shape[0]:
        raise ValueError(f"row range {start}:{stop} is out of 0:{w.shape[0]}")
    if out.dtype != np.float32 or out.shape != (w.shape[1], stop - start) or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float32 of shape {(w.shape[1], stop - start)}")
    _DQT[w.kind](w.codes, w.scale, w.min, start, stop, out)
    return out


_pool: ThreadPoolExecutor | None = None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchless-gemm")
    return _pool


_blas_controller = None


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS at one thread inside the block. The controller (which finds the loaded BLAS
    libraries by reading /proc/self/maps, 1.4 ms) is made once: the engine enters this every
    step, where finding them anew cost 5% of a batched decode step."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # without it BLAS keeps its own threads: slower, still correct
            yield
            return
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
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


# Rows of a weight expanded and multiplied at a time: their float32 copy (cols x BLOCK_ROWS,
# 576 KiB at cols 1152) stays in L2 between the expansion and the sgemm that reads it, where
# expanding a thread's whole share first wrote, then read back, 4 bytes per weight through
# memory. SmolLM2's MLP products at 1 thread, 96 rows of X: 17% faster (6% at 256 rows); 128
# beat 32, 64 and 256.
BLOCK_ROWS = 128


def _part(w: PackedWeight, X: np.ndarray, out: np.ndarray, r0: int, r1: int):
    cols = w.shape[1]
    for b0 in range(r0, r1, BLOCK_ROWS):
        b1 = min(r1, b0 + BLOCK_ROWS)
        wt = _buffer("weights", cols * (b1 - b0)).reshape(cols, b1 - b0)
        dequantize_transposed_into(w, wt, b0, b1)
        result = _buffer("result", X.shape[0] * (b1 - b0)).reshape(X.shape[0], b1 - b0)
        np.matmul(X, wt, out=result)
        out[:, b0:b1] = result


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
