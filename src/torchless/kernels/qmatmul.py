"""Matrix-vector and matrix-matrix products on GGML-quantized weights, in numba.

Why this layout
---------------
A decode step is one matvec per weight matrix, and measured on the reference machine the
obvious kernels are slow: a per-row dot over the 32 weights of a block needs a horizontal
reduction per block and does not vectorize well (about 1.4-1.8 GB/s of Q4_1 weights read,
i.e. ~20-26 tok/s on SmolLM2-135M), whether x stays float or is quantized to int8.

What vectorizes is the column-major GEMV shape: put TILE = 32 rows side by side so that the
vectorized loop runs over the 32 rows of a tile, stride 1, each lane with its own accumulator and
its own per-group scale. There is no horizontal reduction at all, the loop is plain float32
mul-add (LLVM turns it into 16-lane FMAs), and x is broadcast, so it stays float32: no
activation quantization, no accuracy loss beyond float32 rounding. Within a group of columns
the row loop is the outer one in the source, with the (constant-length) column loop inside it
split over four partial sums: LLVM unrolls the columns and vectorizes across rows with the sums
in registers. With the column loop outside, each group of 4 columns stored and reloaded the
sums, and that latency bounded decode: Q8_0 at 16 G weights/s on one core, 27 now; Q4_1 at
27, 40 now (benchmarks/bench_decode_kernels.py). The 4-, 5- and 8-bit layouts now sum a
group's codes with direct_tiles.code_sums (LLVM IR, the batched kernels' one-row body), so a
row's matvec and its batched product are the same operations: 1.1-1.25x faster than the numba
loops were (benchmarks/bench_batch_kernel.py's shapes, Emerald Rapids).

The layouts and the repacking are in `packing` (`prepare()` turns every GGML type into "q4", "q8"
or "f32" tiles; scales are float16 bits or float32, read with `widen_row` / `row_value`).

Threading
---------
All kernels are `nogil=True` and allocate their small scratch (per-group sums of x, the tile
accumulators) inside the compiled function, so nothing is shared between concurrent calls:
several Python threads may run `matvec_rows` on different row ranges of the same weight and
the same `out` at once. `matvec_into` / `matmul_into` without a row range use the prange
variants (numba's parallel runtime; calling those from several threads at once is safe with the
omp or tbb threading layers, as installed here (omp), but not with numba's fallback workqueue). Row ranges are cheapest when start and stop are multiples
of TILE: a tile cut by the range is computed whole and only its rows in the range are written.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .direct_tiles import code_sums
from .float_tiles import (expand_bytes, expand_iq4, expand_nibbles, expand_q2, expand_q3, expand_q5, expand_q6,
                          iq4_code_sums, low_code_sums_q2, low_code_sums_q3, scale_row)
from .packing import (F16_SCALE_TYPES, LOOKUP_BYTES, LOW_BIT_BYTES, NIBBLE_SUBSCALE_TYPES, Q3_K, TILE,  # noqa: F401
                      TWO_LEVEL_TYPES, PackedWeight, packed_layout, packed_nbytes, prefetch_group, prefetch_row,
                      prefetch_scales, prepare, row_value, widen_row)

# 'contract' only: lets LLVM fuse a*b+c into FMA. No reassociation is needed (the vectorized
# loop is across rows, each lane summing in program order), so results are deterministic and
# identical between the prange, row-range and threaded variants.
_FM = {"contract"}


# --------------------------------------------------------------------------------------------
# Kernels: one tile of TILE rows at a time. Each writes rows [max(r0, t*TILE), min(r1, ...)).
# --------------------------------------------------------------------------------------------

_Q3_BYTES, _IQ4_BYTES = LOW_BIT_BYTES[Q3_K], LOOKUP_BYTES


@njit(nogil=True, cache=True, inline="always")
def reads_x_sums(codes, mn):
    """Whether a matvec reads x's sums per group of columns (`_group_sums`): for a min term, and
    for Q3_K's 3-bit codes, whose weight is scale * (code - 4)."""
    return mn.shape[1] > 0 or (codes.ndim == 4 and codes.shape[2] == _Q3_BYTES)


@njit(nogil=True, cache=True)
def _group_sums(x, group, xs):
    for g in range(xs.shape[0]):
        a = np.float32(0.0)
        for j in range(group):
            a += x[g * group + j]
        xs[g] = a


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _q6_group_sums(codes, t, g, x, s):
    """The code sums of 6-bit codes (Q6_K), whose scale changes every 16 columns, so the
    halves are summed apart: s[0, r] over the 16 low-nibble columns, s[3, r] over the 16
    high-nibble ones. Bits 2i, 2i+1 of byte 16 + k hold the top two bits of low-nibble column
    4k + i, of byte 20 + k those of high-nibble column 16 + 4k + i: a shift and a mask put
    them in place (bits 4-5). The row loop outside with sums in registers measured 1.15x
    faster than the column loop outside. (The 4-, 5- and 8-bit matvecs take their code sums
    from direct_tiles.code_sums instead.)"""
    o = g * 32
    m4, top = np.uint8(15), np.uint8(48)
    for r in range(TILE):
        a = np.float32(0.0); b = np.float32(0.0); c = np.float32(0.0); d = np.float32(0.0)
        for j in range(0, 16, 4):
            v0 = codes[t, g, j, r]; v1 = codes[t, g, j + 1, r]
            v2 = codes[t, g, j + 2, r]; v3 = codes[t, g, j + 3, r]
            h = codes[t, g, 16 + j // 4, r]
            k = codes[t, g, 20 + j // 4, r]
            a += np.float32(np.uint8((v0 & m4) | ((h << np.uint8(4)) & top))) * x[o + j]
            b += np.float32(np.uint8((v1 & m4) | ((h << np.uint8(2)) & top))) * x[o + j + 1]
            a += np.float32(np.uint8((v2 & m4) | (h & top))) * x[o + j + 2]
            b += np.float32(np.uint8((v3 & m4) | ((h >> np.uint8(2)) & top))) * x[o + j + 3]
            c += np.float32(np.uint8((v0 >> np.uint8(4)) | ((k << np.uint8(4)) & top))) * x[o + j + 16]
            d += np.float32(np.uint8((v1 >> np.uint8(4)) | ((k << np.uint8(2)) & top))) * x[o + j + 17]
            c += np.float32(np.uint8((v2 >> np.uint8(4)) | (k & top))) * x[o + j + 18]
            d += np.float32(np.uint8((v3 >> np.uint8(4)) | ((k >> np.uint8(2)) & top))) * x[o + j + 19]
        s[0, r] = a + b
        s[3, r] = c + d


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _add_halves(acc, scale, mn, xs, t, g, s):
    """acc += group g's two halves of 16 columns, each with its own scale and min: scale x the
    half's code sum (s[0], s[3]) + min x its sum of x (Q6_K, Q2_K)."""
    for half in range(2):
        widen_row(scale, t, 2 * g + half, s, 1)
        widen_row(mn, t, 2 * g + half, s, 2)
        xg = xs[2 * g + half]
        for r in range(TILE):
            # one multiply-add per statement (see _span_codes)
            a = acc[r] + row_value(scale, t, 2 * g + half, r, s, 1) * s[3 * half, r]
            acc[r] = a + row_value(mn, t, 2 * g + half, r, s, 2) * xg


@njit(nogil=True, cache=True, fastmath=_FM)
def _span_q6(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    """_span_codes for 6-bit codes, a scale per 16 columns: the halves of each group apart. Its
    own function, apart from _span_codes' loop (as a branch there, with the accumulation shared
    in a helper, Q4_K's and Q5_K's matvecs ran 1.1-1.3x slower)."""
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        acc[:] = 0.0
        for g in range(codes.shape[1]):
            prefetch_row(codes, t + 1, g, 768)  # the next tile's group (see _span_codes)
            _q6_group_sums(codes, t, g, x, s)
            _add_halves(acc, scale, mn, xs, t, g, s)  # the min (-32 scale) is always kept
        base = t * TILE
        for r in range(max(r0, base), min(r1, base + TILE)):
            out[r] = acc[r - base]


@njit(nogil=True, cache=True, fastmath=_FM)
def _span_low(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    """_span_q6 for 2- and 3-bit codes. Q2_K keeps a min per 16 columns; Q3_K's weight is
    scale * (code - 4), so each half adds scale * (sum of code x - 4 x the half's sum of x)."""
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        three_bit = codes.shape[2] > 8
        acc[:] = 0.0
        for g in range(codes.shape[1]):
            prefetch_row(codes, t + 1, g, 384)  # the next tile's group (see _span_codes)
            # the column sums of the codes into s[0] and s[3] (float_tiles), then each half's share
            if not three_bit:
                low_code_sums_q2(codes, t, g, x, s)
                _add_halves(acc, scale, mn, xs, t, g, s)
                continue
            low_code_sums_q3(codes, t, g, x, s)
            for half in range(2):
                widen_row(scale, t, 2 * g + half, s, 1)
                xg = xs[2 * g + half]
                for r in range(TILE):
                    acc[r] += row_value(scale, t, 2 * g + half, r, s, 1) * (s[3 * half, r] - np.float32(4.0) * xg)
        base = t * TILE
        for r in range(max(r0, base), min(r1, base + TILE)):
            out[r] = acc[r - base]


@njit(nogil=True, cache=True, fastmath=_FM)
def _span_iq4(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    """_span_codes for nibbles that index IQ4NL_VALUES (IQ4_NL, IQ4_XS; no min)."""
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        acc[:] = 0.0
        for g in range(codes.shape[1]):
            prefetch_row(codes, t + 1, g, 544)  # the next tile's group (see _span_codes)
            prefetch_scales(scale, t + 1, g)
            iq4_code_sums(codes, t, g, x, s)
            widen_row(scale, t, g, s, 1)
            for r in range(TILE):
                acc[r] += row_value(scale, t, g, r, s, 1) * s[0, r]
        base = t * TILE
        for r in range(max(r0, base), min(r1, base + TILE)):
            out[r] = acc[r - base]


@njit(nogil=True, cache=True)
def _span_q4(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    """out[r0:r1] = W[r0:r1] x on uint8 codes, tile by tile (a tile cut by the range is computed
    whole, only its rows in the range written), with the caller's scratch s (4, TILE) and acc
    (TILE,). A call per range, not per tile: numba takes a reference to each array argument
    where a function branches into calls as this one does (an NRT_incref and NRT_decref, an
    atomic add each), 16 a call, which per tile were 10-20% of a one-row product."""
    if codes.shape[2] < 16:
        _span_low(codes, scale, mn, x, xs, out, r0, r1, s, acc)
    elif codes.shape[2] == _IQ4_BYTES:
        _span_iq4(codes, scale, mn, x, xs, out, r0, r1, s, acc)
    elif codes.shape[2] > 20:
        _span_q6(codes, scale, mn, x, xs, out, r0, r1, s, acc)
    else:
        _span_codes(codes, scale, mn, x, xs, out, r0, r1, s, acc)


@njit(nogil=True, cache=True, fastmath=_FM)
def _span_codes(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    """4- and 5-bit codes (uint8: Q4_0, Q4_1, Q4_K; Q5_0, Q5_1, Q5_K) and byte codes in groups of
    32 or 16 (int8: Q8_0 and the types converted to it), their group sums from
    direct_tiles.code_sums."""
    n_groups = codes.shape[1]
    has_min = mn.shape[1] > 0
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        acc[:] = 0.0
        for g in range(n_groups):
            # the next tile's group (its byte rows x TILE bytes), while this one computes: the
            # hardware prefetcher alone left a cold decode sweep of Gemma 3's layers at ~8 GB/s
            # (benchmarks/bench_qmatmul.py)
            prefetch_group(codes, t + 1, g)
            prefetch_scales(scale, t + 1, g)
            if has_min:
                prefetch_scales(mn, t + 1, g)
            code_sums(codes, t, g, x, 0, 1, s)  # direct_tiles' one-row code sums, into s[0]
            widen_row(scale, t, g, s, 1)
            if has_min:
                widen_row(mn, t, g, s, 2)
                xg = xs[g]
                for r in range(TILE):
                    # one multiply-add per statement: with two, LLVM may fuse either product, and
                    # chooses differently once a caller inlines this tile (prange vs row-range
                    # results would then differ in the last bit)
                    a = acc[r] + row_value(scale, t, g, r, s, 1) * s[0, r]
                    acc[r] = a + row_value(mn, t, g, r, s, 2) * xg
            else:
                for r in range(TILE):
                    acc[r] += row_value(scale, t, g, r, s, 1) * s[0, r]
        base = t * TILE
        for r in range(max(r0, base), min(r1, base + TILE)):
            out[r] = acc[r - base]


_span_q8 = _span_codes  # "q8" codes come in groups of 32 or 16 only (packing), all code_sums'


@njit(nogil=True, cache=True, fastmath=_FM)
def _dot_tile(wt, x, out, base, r0, r1, acc):
    """out[r] = sum_k wt[k, r - base] x[k] for r in [max(r0, base), min(r1, base + TILE)),
    wt: float32 (cols, TILE), one tile of weights with its rows side by side."""
    cols = wt.shape[0]
    acc[:] = 0.0
    c4 = cols - cols % 4
    for k in range(0, c4, 4):
        x0 = x[k]; x1 = x[k + 1]; x2 = x[k + 2]; x3 = x[k + 3]
        for r in range(TILE):
            a = acc[r]
            a += wt[k, r] * x0
            a += wt[k + 1, r] * x1
            a += wt[k + 2, r] * x2
            a += wt[k + 3, r] * x3
            acc[r] = a
    for k in range(c4, cols):
        for r in range(TILE):
            acc[r] += wt[k, r] * x[k]
    for r in range(max(r0, base), min(r1, base + TILE)):
        out[r] = acc[r - base]


@njit(nogil=True, cache=True, fastmath=_FM)
def _span_f32(codes, scale, mn, x, xs, out, r0, r1, s, acc):
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dot_tile(codes[t], x, out, t * TILE, r0, r1, acc)


# Dequantize a tile's groups g0..g1 into wt[: their columns]: float32, rows side by side (for
# the batched products, a slice at a time: see qmatmul_batch), or a whole tile (cols, TILE).
# buf: (4, TILE) float32 zeros, the scratch rows of a group's scales and mins (row 1 stays
# zero for layouts without mins: + 0.0, as the scalar dequantizers add).

@njit(nogil=True, cache=True)
def _dq_groups_q6(codes, scale, t, g0, g1, wt, buf):
    """_dq_groups_q4 for 6-bit codes (Q6_K): scale * (code - 32), as gguf-py computes it (scale +
    min would round differently), the low-nibble half of group g on scale group 2g, the high
    half on 2g + 1."""
    for g in range(g0, g1):
        scale_row(scale, t, 2 * g, buf, 0)
        scale_row(scale, t, 2 * g + 1, buf, 1)
        for j in range(16):
            expand_q6(codes, t, g, j, buf, wt, (g - g0) * 32 + j)


@njit(nogil=True, cache=True)
def _dq_groups_low(codes, scale, mn, t, g0, g1, wt, buf):
    """_dq_groups_q4 for 2- and 3-bit codes (see float_tiles.expand_q2 / expand_q3): a group's
    two scales in buf rows 0 and 1, Q2_K's two mins in rows 2 and 3."""
    three_bit = codes.shape[2] > 8
    for g in range(g0, g1):
        scale_row(scale, t, 2 * g, buf, 0)
        scale_row(scale, t, 2 * g + 1, buf, 1)
        if three_bit:
            for j in range(8):
                expand_q3(codes, t, g, j, buf, wt, (g - g0) * 32 + j)
        else:
            scale_row(mn, t, 2 * g, buf, 2)
            scale_row(mn, t, 2 * g + 1, buf, 3)
            for j in range(8):
                expand_q2(codes, t, g, j, buf, wt, (g - g0) * 32 + j)


@njit(nogil=True, cache=True)
def _dq_groups_iq4(codes, scale, t, g0, g1, wt, buf):
    """_dq_groups_q4 for nibbles that index IQ4NL_VALUES: scale * value."""
    for g in range(g0, g1):
        scale_row(scale, t, g, buf, 0)
        for j in range(16):
            expand_iq4(codes, t, g, j, buf, wt, (g - g0) * 32 + j)


@njit(nogil=True, cache=True)
def _dq_groups_q4(codes, scale, mn, t, g0, g1, wt, buf):
    """Groups of 32 columns of "q4" codes, whatever their bits."""
    if codes.shape[2] < 16:
        _dq_groups_low(codes, scale, mn, t, g0, g1, wt, buf)
        return
    if codes.shape[2] == _IQ4_BYTES:
        _dq_groups_iq4(codes, scale, t, g0, g1, wt, buf)
        return
    if codes.shape[2] > 20:
        _dq_groups_q6(codes, scale, t, g0, g1, wt, buf)
        return
    five_bit = codes.shape[2] > 16  # the fifth bits of columns j and j + 16 in byte 16 + j // 4
    for g in range(g0, g1):
        scale_row(scale, t, g, buf, 0)
        if mn.shape[1] > 0:
            scale_row(mn, t, g, buf, 1)
        for j in range(16):
            if five_bit:
                expand_q5(codes, t, g, j, buf, wt, (g - g0) * 32 + j)
            else:
                expand_nibbles(codes, t, g, j, buf, wt, (g - g0) * 32 + j)


@njit(nogil=True, cache=True)
def _dq_groups_q8(codes, scale, mn, t, g0, g1, wt, buf):
    """Groups of codes.shape[2] columns of "q8" codes."""
    group = codes.shape[2]
    for g in range(g0, g1):
        scale_row(scale, t, g, buf, 0)
        if mn.shape[1] > 0:
            scale_row(mn, t, g, buf, 1)
        for j in range(group):
            expand_bytes(codes, t, g, j, buf, wt, (g - g0) * group + j)


@njit(nogil=True, cache=True)
def _dq_tile_q4(codes, scale, mn, t, wt):
    _dq_groups_q4(codes, scale, mn, t, 0, codes.shape[1], wt, np.zeros((4, TILE), np.float32))


@njit(nogil=True, cache=True)
def _dq_tile_q8(codes, scale, mn, t, wt):
    _dq_groups_q8(codes, scale, mn, t, 0, codes.shape[1], wt, np.zeros((4, TILE), np.float32))


@njit(nogil=True, cache=True)
def _dq_tile_f32(codes, scale, mn, t, wt):
    wt[:, :] = codes[t]


# Drivers: `_rows_*` run a row range on the calling thread, `_par_*` spread its tiles over
# numba's threads. Written out per kind (not made by a factory) so numba's on-disk cache keys
# them apart.

@njit(nogil=True, cache=True)
def _rows_q4(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    s = np.empty((4, TILE), np.float32)  # sums, widened scales, widened mins, 6-bit high halves' sums
    acc = np.empty(TILE, np.float32)
    _span_q4(codes, scale, mn, x, xs, out, r0, r1, s, acc)


@njit(nogil=True, cache=True, parallel=True)
def _par_q4(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    t0 = r0 // TILE
    for i in prange((r1 + TILE - 1) // TILE - t0):
        s = np.empty((4, TILE), np.float32)  # per task: tasks run on different threads
        acc = np.empty(TILE, np.float32)
        t = t0 + i
        _span_q4(codes, scale, mn, x, xs, out, max(r0, t * TILE), min(r1, t * TILE + TILE), s, acc)


@njit(nogil=True, cache=True)
def _rows_q8(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    s = np.empty((3, TILE), np.float32)  # sums, widened scales, widened mins
    acc = np.empty(TILE, np.float32)
    _span_q8(codes, scale, mn, x, xs, out, r0, r1, s, acc)


@njit(nogil=True, cache=True, parallel=True)
def _par_q8(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    t0 = r0 // TILE
    for i in prange((r1 + TILE - 1) // TILE - t0):
        s = np.empty((3, TILE), np.float32)  # per task: tasks run on different threads
        acc = np.empty(TILE, np.float32)
        t = t0 + i
        _span_q8(codes, scale, mn, x, xs, out, max(r0, t * TILE), min(r1, t * TILE + TILE), s, acc)


@njit(nogil=True, cache=True)
def _rows_f32(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    s = np.empty((3, TILE), np.float32)  # sums, widened scales, widened mins
    acc = np.empty(TILE, np.float32)
    _span_f32(codes, scale, mn, x, xs, out, r0, r1, s, acc)


@njit(nogil=True, cache=True, parallel=True)
def _par_f32(codes, scale, mn, group, x, out, r0, r1):
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    t0 = r0 // TILE
    for i in prange((r1 + TILE - 1) // TILE - t0):
        s = np.empty((3, TILE), np.float32)  # per task: tasks run on different threads
        acc = np.empty(TILE, np.float32)
        t = t0 + i
        _span_f32(codes, scale, mn, x, xs, out, max(r0, t * TILE), min(r1, t * TILE + TILE), s, acc)


@njit(nogil=True, cache=True)
def _dq_rows_q4(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[1], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_q4(codes, scale, mn, t, wt)
        for r in range(max(r0, t * TILE), min(r1, t * TILE + TILE)):
            out[r - r0, :] = wt[:, r - t * TILE]


@njit(nogil=True, cache=True)
def _dq_rows_q8(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[1], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_q8(codes, scale, mn, t, wt)
        for r in range(max(r0, t * TILE), min(r1, t * TILE + TILE)):
            out[r - r0, :] = wt[:, r - t * TILE]


@njit(nogil=True, cache=True)
def _dq_rows_f32(codes, scale, mn, r0, r1, out):
    wt = np.empty((out.shape[1], TILE), np.float32)
    for t in range(r0 // TILE, (r1 + TILE - 1) // TILE):
        _dq_tile_f32(codes, scale, mn, t, wt)
        for r in range(max(r0, t * TILE), min(r1, t * TILE + TILE)):
            out[r - r0, :] = wt[:, r - t * TILE]


_KERNELS = {  # kind -> (rows, prange matvec, dequantize rows)
    "q4": (_rows_q4, _par_q4, _dq_rows_q4),
    "q8": (_rows_q8, _par_q8, _dq_rows_q8),
    "f32": (_rows_f32, _par_f32, _dq_rows_f32),
}


def _check_vec(w: PackedWeight, x, out, row_start, row_stop):
    rows, cols = w.shape
    row_stop = rows if row_stop is None else int(row_stop)
    row_start = int(row_start)
    if not 0 <= row_start <= row_stop <= rows:
        raise ValueError(f"row range {row_start}:{row_stop} is out of 0:{rows}")
    if x.dtype != np.float32 or x.shape != (cols,) or not x.flags.c_contiguous:
        raise ValueError(f"x must be contiguous float32 of shape ({cols},), got {x.dtype} {x.shape}")
    if out.dtype != np.float32 or out.shape != (rows,):
        raise ValueError(f"out must be float32 of shape ({rows},), got {out.dtype} {out.shape}")
    return row_start, row_stop


def matvec_rows(w: PackedWeight, x: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """out[start:stop] = W[start:stop] @ x on the calling thread only (no prange), GIL released.

    For a scheduler's chunks: safe to call from several threads at once on disjoint row ranges
    of the same `out` (ranges should meet at multiples of TILE: a tile is written only within
    the range, but a tile cut by two ranges is computed twice)."""
    start, stop = _check_vec(w, x, out, start, stop)
    if start < stop:
        _KERNELS[w.kind][0](w.codes, w.scale, w.min, w.group, x, out, start, stop)


def matvec_into(w: PackedWeight, x: np.ndarray, out: np.ndarray, row_start: int = 0,
                row_stop: int | None = None) -> None:
    """out[row_start:row_stop] = W[row_start:row_stop] @ x, over numba's threads (prange over
    tiles). x: float32 (cols,), out: float32 (rows,). Allocates nothing at the Python level."""
    row_start, row_stop = _check_vec(w, x, out, row_start, row_stop)
    if row_start < row_stop:
        _KERNELS[w.kind][1](w.codes, w.scale, w.min, w.group, x, out, row_start, row_stop)


def matvec(w: PackedWeight, x: np.ndarray) -> np.ndarray:
    out = np.empty(w.shape[0], np.float32)
    matvec_into(w, np.ascontiguousarray(x, dtype=np.float32), out)
    return out


def dequantize_rows(w: PackedWeight, start: int, stop: int) -> np.ndarray:
    """float32 rows start..stop of W, equal to gguf-py's dequantization (embedding lookups)."""
    if not 0 <= start <= stop <= w.shape[0]:
        raise ValueError(f"row range {start}:{stop} is out of 0:{w.shape[0]}")
    out = np.empty((stop - start, w.shape[1]), np.float32)
    if stop > start:
        _KERNELS[w.kind][2](w.codes, w.scale, w.min, start, stop, out)
    return out


def __getattr__(name: str):
    """matmul_into: the batched products, which live in qmatmul_batch (it builds on the tiles
    here), so that callers keep one module for every product. Looked up on use, not imported at
    the end of this module: importing qmatmul_batch first would then find itself
    half-initialized."""
    if name == "matmul_into":
        from . import qmatmul_batch

        return getattr(qmatmul_batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

