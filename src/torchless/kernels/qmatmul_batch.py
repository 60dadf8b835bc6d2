"""Batched products (1..64 rows of X) on packed weights, in float32 arithmetic.

Which kernel, by rows of X
--------------------------
Under DIRECT_MAX_ROWS (5) rows on 4-, 5-, 6-bit and byte codes, the direct kernels of
`direct_tiles`: codes converted to float32 in registers, scales applied per group. From 5 rows,
and at every size on the 2- and 3-bit and IQ4 layouts and on "f32" weights, each 32-row tile
is expanded to float32 once per call, a slice of SLICE_COLS columns at a time (16 KB, in L1),
and each slice multiplied with blocks of 8, 4, 2 and 1 rows of X whose sums stay in registers
(kernels/float_tiles): one FMA of 16 lanes per weight per row and nothing else per weight, so the
cost per row falls as the rows share the expansion. Measured on one core (AMD EPYC, Zen 4;
`python benchmarks/bench_batch_kernel.py --threads 1 --m 4,8,16,64`), us per row of X, medians
of 5 rounds, when a whole tile was expanded at once: SmolLM2's 1536 x 576 Q4_1 at 4 rows 35, 8
rows 24, 16 rows 19, 64 rows 17; its 49152 x 576 Q8_0 head at 4 rows 1495, 8 rows 1005, 16 rows
776 (direct_tiles has the numbers under 5 rows). See SLICE_COLS for what slicing gained.

A row's result does not depend on the other rows of its call within a kernel (each row of X
gets the same sequence of operations in any block), but the direct and the expanded kernels
round differently, so a row multiplied with 3 others and the same row multiplied with 4 others
can differ in the last bits.

Until the direct kernels, 2 and 3 rows ran integer kernels: AVX-512 VNNI dots of the codes with
each activation quantized to three int8 levels. One int8 level per activation, as llama.cpp's
q8 activations, moved SmolLM2's logits by up to 0.45 on the LM head alone and two levels the
whole model by 1.04e-2, past the 2e-3 parity gate against transformers (activations have
outliers 20-70 times their RMS: benchmarks/activation_levels.py); with three the dots cost
three times as much, and the direct kernels were as fast or faster at every size the integer
ones took, so those were deleted.

With $TORCHLESS_INT16_ACTIVATIONS=1 on a host with AVX-512 VNNI, 2 to 32 rows of X on plain
nibbles (Q4_0, Q4_1, Q4_K) and 2 to 16 on byte codes (Q8_0, and the types converted to it) go
to the int16-activation kernels of `int16_tiles` instead: up to 1.4-1.8x faster products, at
about 2e-5 of a product's size in accuracy (see there).

Tile-range functions (`_float_range_*`) are what both the prange drivers here and the task
scheduler of `adaptive` run.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import qmatmul
from .direct_tiles import _store, direct_sums, direct_tiles, takes_direct
from .float_tiles import rows_dot_1, rows_dot_2, rows_dot_4, rows_dot_8
from .int16_tiles import prepare_x, run_tiles, takes_int16
from .qmatmul import TILE, PackedWeight


# Columns of a tile expanded at a time: 128 x TILE float32 (16 KB) stay in L1 while every block
# of rows passes over them. A whole tile of SmolLM2's projections (576 or 1536 columns, 72 or
# 192 KB) did not, and the expansion's stores and the passes' loads went to L2. Slicing made
# its Q4_1 products 1.3-1.8x faster at 8 to 32 rows (1.5x at 16; one Emerald Rapids core,
# alternating whole-tile and sliced runs in one process), with the same sums.
SLICE_COLS = 128


@njit(nogil=True, cache=True)
def _multiply_slice(wt, X, k0, cols, acc):
    """acc[m, :] += X[m, k0:k0 + cols] @ wt[:cols] for every row m of X: blocks of 8, 4, 2 and
    1 rows, each a pass over the slice with its sums in registers (float_tiles). acc has 3
    spare rows past X's: 3 rows go as a block of 4 with a copy of the last. A pass of 1, 2
    or 4 rows costs the same, each bound by its chains of dependent FMAs (2, 4 or 8 accumulators
    of 4-cycle FMAs) rather than by the FMA units, so 2 + 1 rows cost twice a padded 4: a
    product of 15 rows cost 1.14x one of 16 on SmolLM2's shapes, and 1.03-1.06x padded (one
    core, alternating M = 11, 15, 16 in one process). A server's batch is often 15."""
    M = X.shape[0]
    m = 0
    while m < M:
        n = M - m
        if n >= 8:
            rows_dot_8(wt, X, m, k0, cols, acc)
            n = 8
        elif n >= 3:
            rows_dot_4(wt, X, m, k0, cols, acc)
            n = 4
        elif n == 2:
            rows_dot_2(wt, X, m, k0, cols, acc)
        else:
            rows_dot_1(wt, X, m, k0, cols, acc)
        m += n


@njit(nogil=True, cache=True)
def x_terms(codes, mn, X):
    """What the tile ranges of one product read besides X, computed once per product rather
    than per task: the int16 activations (int16_tiles.prepare), or X's group sums (direct_sums)."""
    if takes_int16(codes, X):
        return prepare_x(codes, mn, X)
    return direct_sums(codes, mn, X)


# One per kind (not a factory): numba's on-disk cache keys functions by name. `_float_range_*`
# run tiles t0..t1 given x_terms(codes, mn, X); `_float_tiles_*` are the one-call entries that
# compute them.

@njit(nogil=True, cache=True)
def _float_range_q4(codes, scale, mn, X, xs, out, t0, t1):
    if takes_int16(codes, X):
        run_tiles(codes, scale, mn, X, xs, out, t0, t1)
    elif takes_direct(codes, X):
        direct_tiles(codes, scale, mn, X, xs, out, t0, t1)
    else:
        _expanded_tiles_q4(codes, scale, mn, X, out, t0, t1)


@njit(nogil=True, cache=True)
def _expanded_tiles_q4(codes, scale, mn, X, out, t0, t1):
    per = SLICE_COLS // 32  # groups of 32 columns a slice
    wt = np.empty((per * 32, TILE), np.float32)
    acc = np.empty((X.shape[0] + 3, TILE), np.float32)
    buf = np.zeros((4, TILE), np.float32)
    for t in range(t0, t1):
        acc[:] = 0.0
        for g0 in range(0, codes.shape[1], per):
            g1 = min(codes.shape[1], g0 + per)
            qmatmul._dq_groups_q4(codes, scale, mn, t, g0, g1, wt, buf)
            _multiply_slice(wt, X, g0 * 32, (g1 - g0) * 32, acc)
        _store(acc, out, t, 0, X.shape[0])


@njit(nogil=True, cache=True)
def _float_range_q8(codes, scale, mn, X, xs, out, t0, t1):
    if takes_int16(codes, X):
        run_tiles(codes, scale, mn, X, xs, out, t0, t1)
    elif takes_direct(codes, X):
        direct_tiles(codes, scale, mn, X, xs, out, t0, t1)
    else:
        _expanded_tiles_q8(codes, scale, mn, X, out, t0, t1)


@njit(nogil=True, cache=True)
def _expanded_tiles_q8(codes, scale, mn, X, out, t0, t1):
    group = codes.shape[2]
    per = max(1, SLICE_COLS // group)
    wt = np.empty((per * group, TILE), np.float32)
    acc = np.empty((X.shape[0] + 3, TILE), np.float32)
    buf = np.zeros((4, TILE), np.float32)
    for t in range(t0, t1):
        acc[:] = 0.0
        for g0 in range(0, codes.shape[1], per):
            g1 = min(codes.shape[1], g0 + per)
            qmatmul._dq_groups_q8(codes, scale, mn, t, g0, g1, wt, buf)
            _multiply_slice(wt, X, g0 * group, (g1 - g0) * group, acc)
        _store(acc, out, t, 0, X.shape[0])


@njit(nogil=True, cache=True)
def _float_range_f32(codes, scale, mn, X, xs, out, t0, t1):
    acc = np.empty((X.shape[0] + 3, TILE), np.float32)
    for t in range(t0, t1):
        acc[:] = 0.0
        _multiply_slice(codes[t], X, 0, X.shape[1], acc)
        _store(acc, out, t, 0, X.shape[0])


@njit(nogil=True, cache=True)
def _float_tiles_q4(codes, scale, mn, X, out, t0, t1):
    _float_range_q4(codes, scale, mn, X, x_terms(codes, mn, X), out, t0, t1)


@njit(nogil=True, cache=True)
def _float_tiles_q8(codes, scale, mn, X, out, t0, t1):
    _float_range_q8(codes, scale, mn, X, x_terms(codes, mn, X), out, t0, t1)


@njit(nogil=True, cache=True)
def _float_tiles_f32(codes, scale, mn, X, out, t0, t1):
    _float_range_f32(codes, scale, mn, X, X[:, :0], out, t0, t1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_q4(codes, scale, mn, X, out):
    xs = x_terms(codes, mn, X)
    for t in prange(codes.shape[0]):
        _float_range_q4(codes, scale, mn, X, xs, out, t, t + 1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_q8(codes, scale, mn, X, out):
    xs = x_terms(codes, mn, X)
    for t in prange(codes.shape[0]):
        _float_range_q8(codes, scale, mn, X, xs, out, t, t + 1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_f32(codes, scale, mn, X, out):
    for t in prange(codes.shape[0]):
        _float_range_f32(codes, scale, mn, X, X[:, :0], out, t, t + 1)


FLOAT_TILES = {"q4": _float_tiles_q4, "q8": _float_tiles_q8, "f32": _float_tiles_f32}
_FLOAT_PAR = {"q4": _float_par_q4, "q8": _float_par_q8, "f32": _float_par_f32}


def check_batch(w: PackedWeight, X: np.ndarray, out: np.ndarray) -> None:
    rows, cols = w.shape
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[1] != cols or not X.flags.c_contiguous:
        raise ValueError(f"X must be contiguous float32 of shape (M, {cols}), got {X.dtype} {X.shape}")
    if out.dtype != np.float32 or out.shape != (X.shape[0], rows):
        raise ValueError(f"out must be float32 of shape ({X.shape[0]}, {rows}), got {out.dtype} {out.shape}")


def matmul_into(w: PackedWeight, X: np.ndarray, out: np.ndarray) -> None:
    """out = X @ W.T: X float32 (M, cols), out float32 (M, rows), over numba's threads (prange
    over tiles). Each weight tile is read from memory once per call, whatever M (see the module
    docstring for the kernels)."""
    check_batch(w, X, out)
    if X.shape[0]:
        _FLOAT_PAR[w.kind](w.codes, w.scale, w.min, X, out)
