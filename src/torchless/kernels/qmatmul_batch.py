"""Batched products (1..64 rows of X) on packed weights: on 4-, 5-, 6-bit and byte codes, the
direct kernels of `direct_tiles` for 1 to 4 rows (codes converted in registers, scales applied
per group), float32 multiply-adds on each tile expanded once per call from 5 rows on; on the
2- and 3-bit and IQ4 layouts, expanded tiles at every batch size. (The matvec kernels of
`qmatmul` take one row where a caller asks for a matvec; a micro-batch of one row comes here.)

The integer kernels below (VNNI dots on int8 activations in three levels) ran 1 to 3 rows
until the direct kernels, as fast or faster at every size they take (see direct_tiles), took
those products: `takes_float` now sends every product to the float kernels, and the integer
ones stay for benchmarks/bench_batch_kernel.py, which measures all three at every M.

Which kernel, by rows of X (the integer and expanded kernels; `direct_tiles` has its own numbers)
----------------------------------------------------------------------------------------------
From FLOAT_MIN_ROWS (4) rows, each 32-row tile is expanded to float32 once per call (cols x 32,
in L1/L2) and multiplied with blocks of 8, 4, 2 and 1 rows of X whose sums stay in registers
(kernels/float_tiles): one FMA of 16 lanes per weight per row, but nothing else per weight,
so the cost per row falls as the rows share the expansion. Under 4 rows the expansion is not
paid back, and the integer kernels below are faster. Measured on one core (AMD EPYC, Zen 4;
`python benchmarks/bench_batch_kernel.py --threads 1 --m 2,3,4,8,16,32,64`), us per row of X,
integer against float (medians of 5 rounds): SmolLM2's 1536 x 576 Q4_1 at 2 rows 39 against 44,
3 rows 45 against 40, 4 rows 39 against 35, 8 rows 35 against 24, 16 rows 31 against 19, 64
rows 31 against 17; its 49152 x 576 Q8_0 head at 2 rows 1443 against 2410, 4 rows 1371 against
1495 (the one shape where 4 rows still favour integers), 8 rows 1315 against 1005, 16 rows 1272
against 776. The float kernels also run where the host lacks AVX-512 VNNI, at every batch size,
on "f32" weights, and on the 2- and 3-bit codes of Q2_K and Q3_K (`takes_float`), for which
there are no integer kernels.

A row's result does not depend on the other rows of its call in either kernel (each row of X
gets the same sequence of operations in any block), but the two kernels round differently, so a
row multiplied with 2 others and the same row multiplied with 3 others can differ in the last
bits: the float kernel is float32 rounding of the exact product, the integer one the error of
its three activation levels (below).

Why integers (2 and 3 rows)
---------------------------
The matvec kernels of `qmatmul` spend one FMA per weight per row of X (16 multiply-adds per
instruction) plus the conversion of each code to float32, so a row costs about as much at 2
rows as alone. AVX-512 VNNI's `vpdpbusd` does 64 multiply-adds of unsigned by signed bytes per
instruction into 16 int32 lanes, and the codes are already bytes: with X quantized to int8 a
row costs ~4x less per dot. numba does not emit `vpdpbusd` from
loops (LLVM has no pattern for it from per-lane code), so the inner block is written as LLVM
IR (`_make_group_dot`): one call computes the int32 dots of one 32-row tile's group of codes
with a block of X rows, accumulators in registers.

Accuracy: three int8 levels per activation
------------------------------------------
One int8 per activation (as llama.cpp's q8 activations) is far past the 2e-3 parity gate
against transformers: on the LM head alone it moves logits by up to 0.45 on SmolLM2 and 0.89 on
Gemma 3 270M (random prompts, every position); two levels by 1.9e-3 and 3.5e-3 there, and the
whole SmolLM2 by 1.04e-2 on "The capital of France is". A group's step is set by its largest
activation, and the inputs have outliers 20-70 times their RMS (benchmarks/activation_levels.py).
So each row of X becomes three int8 rows: round(x / d) with d = max|x| / 127 over the group,
then the rounded residual of the levels before in steps 254x finer (d / 254, d / 254^2). The
sum is within d / 129032 of x, the integer sums are exact, and the cost is three dots instead
of one. The codes stay in the tiled layout of `qmatmul`
(codes[t, g, j, r]: column j of a group, row r of the tile); a 4 x 32 byte block is transposed
in registers into the per-row 4-byte groups that `vpdpbusd` multiplies. Signed "q8" codes get
+128 (a sign-bit flip) to be unsigned, and 128 * sum(x codes) is taken back off exactly.

`available()` says whether this host has the instructions; without them only the float kernels
run. Tile-range functions (`_tiles_q4`, `_tiles_q8`, `_float_tiles_*`) are what both the prange
drivers here and the task scheduler of `adaptive` run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import qmatmul
from .direct_tiles import direct_sums, direct_tiles, takes_direct
from .float_tiles import rows_dot_1, rows_dot_2, rows_dot_4, rows_dot_8
from .packing import LOOKUP_BYTES as _IQ4_BYTES
from .qmatmul import TILE, PackedWeight, row_value, widen_row

_FM = {"contract"}
# Rows of X per pass over a tile. The engine takes these kernels for 2 and 3 rows only; the
# 4-row blocks serve benchmarks/bench_batch_kernel.py, which forces them at every M to show
# where the float kernels overtake them (FLOAT_MIN_ROWS).
ROW_BLOCK = 4
LEVELS = 3  # int8 rows per row of X (see the module docstring)
FLOAT_MIN_ROWS = 4  # from this many rows of X, the float kernels (see the module docstring)
_I8, _I32 = ir.IntType(8), ir.IntType(32)


def available() -> bool:
    features = _llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))


def _make_group_dot(n_quads: int, nibbles: bool, n_xrows: int, fifth_bits: bool = False,
                    sixth_bits: bool = False):
    """An intrinsic isum[i, r] = sum_c u8(code[t, g, c, r]) * xq[m0 + i, x0 + c] for i <
    n_xrows, r < TILE, over the n_quads * 4 columns of group g (twice that for packed nibbles:
    low nibble column c, high nibble column c + 16; with fifth_bits, the 5-bit codes of the
    "q4" layout, their fifth bits in byte 16 + c // 4: see packing). xq4 is xq viewed as int32
    (4 columns each), x0 = g * (columns of a group). With sixth_bits (6-bit codes, their top
    two bits in bits 2k, 2k + 1 of byte 16 + c // 4, or 20 + c // 4 for the high nibbles), whose
    scale changes every 16 columns, the halves are summed apart: the low-nibble columns' sums in
    rows i of isum, the high-nibble ones' in rows n_xrows + i."""

    @intrinsic
    def group_dot(typingctx, codes, t, g, xq4, m0, isum):
        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            xq_a = context.make_array(sig.args[3])(context, builder, args[3])
            isum_a = context.make_array(sig.args[5])(context, builder, args[5])
            t_, g_, m0_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4))
            v16, v64, v128 = ir.VectorType(_I32, 16), ir.VectorType(_I8, 64), ir.VectorType(_I8, 128)
            dpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.x86.avx512.vpdpbusd.512")
            acc = [[ir.Constant(v16, [0] * 16) for _ in range(2)] for _ in range(n_xrows * (2 if sixth_bits else 1))]
            # bytes of 4 columns x 32 rows (column-major) -> two halves of 16 rows, each row's
            # 4 bytes adjacent: out[4 r + k] = in[32 k + r]
            transposes = [ir.Constant(ir.VectorType(_I32, 64), [32 * k + 16 * h + r for r in range(16)
                                                                  for k in range(4)]) for h in (0, 1)]
            # a row's byte of fifth bits, next to each of its 4 codes; bit k (bit 4 + k) is that
            # of low-nibble (high-nibble) column k of the quad
            spreads = [ir.Constant(ir.VectorType(_I32, 64), [16 * h + r for r in range(16) for k in range(4)])
                       for h in (0, 1)]
            bit_of = [ir.Constant(v64, [(1 << k) << shift for _ in range(16) for k in range(4)]) for shift in (0, 4)]
            v32 = ir.VectorType(_I8, 32)
            x0 = builder.mul(g_, intp(n_quads * (2 if nibbles else 1)))
            xrows = [cgutils.get_item_pointer(context, builder, sig.args[3], xq_a,
                                              [builder.add(m0_, intp(i)), x0]) for i in range(n_xrows)]
            for q in range(n_quads):
                p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, intp(4 * q), intp(0)])
                block = builder.load(builder.bitcast(p, v128.as_pointer()), align=1)
                halves = [builder.shuffle_vector(block, ir.Constant(v128, ir.Undefined), m) for m in transposes]
                if nibbles:
                    low = [builder.and_(h, ir.Constant(v64, [15] * 64)) for h in halves]
                    high = [builder.lshr(h, ir.Constant(v64, [4] * 64)) for h in halves]
                    zero = ir.Constant(v64, [0] * 64)
                    # (the nibbles it completes, byte, mask of each lane's bit, value it adds) per
                    # high bit of the codes
                    if sixth_bits:
                        planes = [(nib, 16 + 4 * which + q,
                                   ir.Constant(v64, [(b << 2 * k) for _ in range(16) for k in range(4)]), 16 * b)
                                  for which, nib in enumerate((low, high)) for b in (1, 2)]
                    elif fifth_bits:
                        planes = [(nib, 16 + q, bit_of[which], 16) for which, nib in enumerate((low, high))]
                    else:
                        planes = []
                    for nib, byte, mask, value in planes:
                        pb = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, intp(byte), intp(0)])
                        bits = builder.load(builder.bitcast(pb, v32.as_pointer()), align=1)
                        for h in (0, 1):
                            near = builder.shuffle_vector(bits, ir.Constant(v32, ir.Undefined), spreads[h])
                            on = builder.icmp_unsigned("!=", builder.and_(near, mask), zero)
                            nib[h] = builder.or_(nib[h], builder.select(on, ir.Constant(v64, [value] * 64), zero))
                    columns = [(q, low, 0), (q + n_quads, high, n_xrows if sixth_bits else 0)]
                else:  # signed codes + 128: unsigned bytes, as vpdpbusd wants its first operand
                    columns = [(q, [builder.xor(h, ir.Constant(v64, [-128] * 64)) for h in halves], 0)]
                for xq_col, weights, first in columns:
                    weights = [builder.bitcast(w, v16) for w in weights]
                    for i in range(n_xrows):
                        x4 = builder.load(builder.gep(xrows[i], [intp(xq_col)]), align=4)
                        xb = builder.insert_element(ir.Constant(v16, ir.Undefined), x4, ir.Constant(_I32, 0))
                        xb = builder.shuffle_vector(xb, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16))
                        for h in range(2):
                            acc[first + i][h] = builder.call(dpbusd, [acc[first + i][h], weights[h], xb])
            for i in range(len(acc)):
                for h in range(2):
                    p = cgutils.get_item_pointer(context, builder, sig.args[5], isum_a, [intp(i), intp(16 * h)])
                    builder.store(acc[i][h], builder.bitcast(p, v16.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(codes, t, g, xq4, m0, isum), codegen

    return group_dot


# One intrinsic per code layout and block of X rows (LEVELS int8 rows for each of 4, 2 or 1 rows).
_dot_q4_4, _dot_q4_2, _dot_q4_1 = (_make_group_dot(4, True, LEVELS * n) for n in (4, 2, 1))
_dot_q5_4, _dot_q5_2, _dot_q5_1 = (_make_group_dot(4, True, LEVELS * n, True) for n in (4, 2, 1))
_dot_q6_4, _dot_q6_2, _dot_q6_1 = (_make_group_dot(4, True, LEVELS * n, sixth_bits=True) for n in (4, 2, 1))
_dot_q8g32_4, _dot_q8g32_2, _dot_q8g32_1 = (_make_group_dot(8, False, LEVELS * n) for n in (4, 2, 1))
_dot_q8g16_4, _dot_q8g16_2, _dot_q8g16_1 = (_make_group_dot(4, False, LEVELS * n) for n in (4, 2, 1))


@njit(nogil=True, cache=True, fastmath=_FM)
def quantize_rows(X, group, xq, dx, xs, sq):
    """Row m of X -> int8 rows LEVELS m + k (k < LEVELS) of xq, per group of columns: level 0
    is round(x / d) with d = max|x| / 127, each next level the rounded residual of the levels
    before it in steps 254x finer, so x ~ sum_k dx[LEVELS m + k, g] * xq[LEVELS m + k].
    xs[m, g]: the float sum of the group (the min term); sq[i, g]: the sum of row i's codes
    (taken back off for the +128 of signed weight codes)."""
    M, cols = X.shape
    for m in range(M):
        for g in range(cols // group):
            o = g * group
            amax = np.float32(0.0)
            total = np.float32(0.0)
            for j in range(group):
                amax = max(amax, abs(X[m, o + j]))
                total += X[m, o + j]
            xs[m, g] = total
            d = amax / np.float32(127.0)
            for k in range(LEVELS):
                i = LEVELS * m + k
                inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
                codes_sum = 0
                for j in range(group):
                    rest = X[m, o + j]
                    for kk in range(k):  # what the coarser levels left
                        rest -= np.float32(xq[LEVELS * m + kk, o + j]) * dx[LEVELS * m + kk, g]
                    q = min(127.0, max(-127.0, np.rint(rest * inv)))
                    xq[i, o + j] = np.int8(q)
                    codes_sum += np.int32(q)
                dx[i, g] = d
                sq[i, g] = codes_sum
                d = d / np.float32(254.0)


@njit(nogil=True, cache=True, fastmath=_FM)
def _accumulate(acc, isum, scale, mn, t, g, buf, dx, xs, sq, m0, n, offset, first):
    """acc[i] += scale group g's share of row m0 + i (i < n) from the integer sums of its levels,
    isum rows first + LEVELS i + k (the group's scales and mins already widened into buf: see
    packing.widen_row)."""
    has_min = mn.shape[1] > 0
    for i in range(n):
        m = m0 + i
        xg = xs[m, g]
        for r in range(TILE):
            v = np.float32(0.0)
            for k in range(LEVELS):
                v += dx[LEVELS * m + k, g] * np.float32(isum[first + LEVELS * i + k, r] - offset * sq[LEVELS * m + k, g])
            a = acc[i, r] + row_value(scale, t, g, r, buf, 0) * v
            acc[i, r] = a + row_value(mn, t, g, r, buf, 1) * xg if has_min else a


@njit(nogil=True, cache=True)
def _store(acc, out, t, m0, n):
    base = t * TILE
    for i in range(n):
        for r in range(base, min(out.shape[1], base + TILE)):
            out[m0 + i, r] = acc[i, r - base]


@njit(nogil=True, cache=True, fastmath=_FM)
def _tiles_q4(codes, scale, mn, xq4, dx, xs, sq, out, t0, t1):
    """out[:, rows of tiles t0..t1] for every row of X; each tile's codes are read once from
    memory and then stay in L1 for all the row blocks."""
    if codes.shape[2] > 20:
        _tiles_q6(codes, scale, mn, xq4, dx, xs, sq, out, t0, t1)
        return
    M = xs.shape[0]
    isum = np.empty((LEVELS * ROW_BLOCK, TILE), np.int32)
    acc = np.empty((ROW_BLOCK, TILE), np.float32)
    has_min = mn.shape[1] > 0
    buf = np.empty((2, TILE), np.float32)  # a group's scales and mins, widened (float16 bits)
    five_bit = codes.shape[2] > 16
    for t in range(t0, t1):
        m0 = 0
        while m0 < M:
            n = min(ROW_BLOCK, M - m0) if M - m0 != 3 else 2  # blocks of 4, 2, 1 rows
            acc[:n] = 0.0
            for g in range(codes.shape[1]):
                if five_bit and n == 4:
                    _dot_q5_4(codes, t, g, xq4, LEVELS * m0, isum)
                elif five_bit and n == 2:
                    _dot_q5_2(codes, t, g, xq4, LEVELS * m0, isum)
                elif five_bit:
                    _dot_q5_1(codes, t, g, xq4, LEVELS * m0, isum)
                elif n == 4:
                    _dot_q4_4(codes, t, g, xq4, LEVELS * m0, isum)
                elif n == 2:
                    _dot_q4_2(codes, t, g, xq4, LEVELS * m0, isum)
                else:
                    _dot_q4_1(codes, t, g, xq4, LEVELS * m0, isum)
                widen_row(scale, t, g, buf, 0)
                if has_min:
                    widen_row(mn, t, g, buf, 1)
                _accumulate(acc, isum, scale, mn, t, g, buf, dx, xs, sq, m0, n, 0, 0)
            _store(acc, out, t, m0, n)
            m0 += n


@njit(nogil=True, cache=True, fastmath=_FM)
def _tiles_q6(codes, scale, mn, xq4, dx, xs, sq, out, t0, t1):
    """_tiles_q4 for 6-bit codes, a scale (and X's groups) per 16 columns: each half of a group
    accumulated on its own. Its own function: as a branch in _tiles_q4's loop, Q4_1's batched
    products ran 1.1-1.35x slower."""
    M = xs.shape[0]
    isum = np.empty((2 * LEVELS * ROW_BLOCK, TILE), np.int32)  # the low halves' rows, then the high
    acc = np.empty((ROW_BLOCK, TILE), np.float32)
    buf = np.empty((2, TILE), np.float32)
    for t in range(t0, t1):
        m0 = 0
        while m0 < M:
            n = min(ROW_BLOCK, M - m0) if M - m0 != 3 else 2
            acc[:n] = 0.0
            for g in range(codes.shape[1]):
                if n == 4:
                    _dot_q6_4(codes, t, g, xq4, LEVELS * m0, isum)
                elif n == 2:
                    _dot_q6_2(codes, t, g, xq4, LEVELS * m0, isum)
                else:
                    _dot_q6_1(codes, t, g, xq4, LEVELS * m0, isum)
                for half in range(2):  # the min (-32 scale) is always kept
                    widen_row(scale, t, 2 * g + half, buf, 0)
                    widen_row(mn, t, 2 * g + half, buf, 1)
                    _accumulate(acc, isum, scale, mn, t, 2 * g + half, buf, dx, xs, sq, m0, n, 0, half * LEVELS * n)
            _store(acc, out, t, m0, n)
            m0 += n


@njit(nogil=True, cache=True, fastmath=_FM)
def _tiles_q8(codes, scale, mn, xq4, dx, xs, sq, out, t0, t1):
    """As _tiles_q4, for signed byte codes in groups of 32 (Q8_0, IQ4_NL, ...) or 16 (IQ2_XS,
    IQ2_S, IQ1_M) columns."""
    M = xs.shape[0]
    wide = codes.shape[2] == 32
    isum = np.empty((LEVELS * ROW_BLOCK, TILE), np.int32)
    acc = np.empty((ROW_BLOCK, TILE), np.float32)
    has_min = mn.shape[1] > 0
    buf = np.empty((2, TILE), np.float32)  # a group's scales and mins, widened (float16 bits)
    for t in range(t0, t1):
        m0 = 0
        while m0 < M:
            n = min(ROW_BLOCK, M - m0) if M - m0 != 3 else 2
            acc[:n] = 0.0
            for g in range(codes.shape[1]):
                if wide and n == 4:
                    _dot_q8g32_4(codes, t, g, xq4, LEVELS * m0, isum)
                elif wide and n == 2:
                    _dot_q8g32_2(codes, t, g, xq4, LEVELS * m0, isum)
                elif wide:
                    _dot_q8g32_1(codes, t, g, xq4, LEVELS * m0, isum)
                elif n == 4:
                    _dot_q8g16_4(codes, t, g, xq4, LEVELS * m0, isum)
                elif n == 2:
                    _dot_q8g16_2(codes, t, g, xq4, LEVELS * m0, isum)
                else:
                    _dot_q8g16_1(codes, t, g, xq4, LEVELS * m0, isum)
                widen_row(scale, t, g, buf, 0)
                if has_min:
                    widen_row(mn, t, g, buf, 1)
                _accumulate(acc, isum, scale, mn, t, g, buf, dx, xs, sq, m0, n, 128, 0)
            _store(acc, out, t, m0, n)
            m0 += n


@njit(nogil=True, cache=True, inline="always")
def takes_float(codes, X):
    """Whether a product runs the float kernels (direct or expanded) rather than the integer ones:
    for every product since the direct kernels (see the module docstring): under FLOAT_MIN_ROWS
    rows of X the direct kernels take every layout with integer kernels."""
    return (X.shape[0] >= FLOAT_MIN_ROWS or takes_direct(codes, X) or codes.shape[2] < 16
            or codes.shape[2] == _IQ4_BYTES)


@njit(nogil=True, cache=True)
def quantized_activations(X, group):
    """(xq viewed as int32 columns of 4, dx, xs, sq) for the tile functions; see quantize_rows."""
    M, cols = X.shape
    n_groups = cols // group
    xq = np.empty((LEVELS * M, cols), np.int8)
    dx = np.empty((LEVELS * M, n_groups), np.float32)
    sq = np.empty((LEVELS * M, n_groups), np.int32)
    xs = np.empty((M, n_groups), np.float32)
    quantize_rows(X, group, xq, dx, xs, sq)
    return xq.view(np.int32), dx, xs, sq


@njit(nogil=True, cache=True, parallel=True)
def _par_q4(codes, scale, mn, group, X, out):
    if takes_float(codes, X):
        _float_par_q4(codes, scale, mn, X, out)
        return
    xq4, dx, xs, sq = quantized_activations(X, group)
    for t in prange(codes.shape[0]):
        _tiles_q4(codes, scale, mn, xq4, dx, xs, sq, out, t, t + 1)


@njit(nogil=True, cache=True, parallel=True)
def _par_q8(codes, scale, mn, group, X, out):
    if takes_float(codes, X):
        _float_par_q8(codes, scale, mn, X, out)
        return
    xq4, dx, xs, sq = quantized_activations(X, group)
    for t in prange(codes.shape[0]):
        _tiles_q8(codes, scale, mn, xq4, dx, xs, sq, out, t, t + 1)


@njit(nogil=True, cache=True)
def _serial_q4(codes, scale, mn, group, X, out):
    if takes_float(codes, X):
        _float_tiles_q4(codes, scale, mn, X, out, 0, codes.shape[0])
        return
    xq4, dx, xs, sq = quantized_activations(X, group)
    _tiles_q4(codes, scale, mn, xq4, dx, xs, sq, out, 0, codes.shape[0])


@njit(nogil=True, cache=True)
def _serial_q8(codes, scale, mn, group, X, out):
    if takes_float(codes, X):
        _float_tiles_q8(codes, scale, mn, X, out, 0, codes.shape[0])
        return
    xq4, dx, xs, sq = quantized_activations(X, group)
    _tiles_q8(codes, scale, mn, xq4, dx, xs, sq, out, 0, codes.shape[0])


# --------------------------------------------------------------------------------------------
# Float kernels: every product. Under DIRECT_MAX_ROWS rows of X on 4-, 5-, 6-bit and byte codes
# the direct kernels (direct_tiles); else each tile is expanded to float32 once (cols x TILE, in
# L1/L2) and multiplied with every row of X.
# --------------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _multiply_tile(wt, X, out, t, acc):
    """out[:, rows of tile t] = X @ wt: blocks of 8, 4, 2 and 1 rows of X, each a pass over the
    expanded tile with its sums in registers (float_tiles)."""
    M = X.shape[0]
    m = 0
    while m < M:
        n = M - m
        if n >= 8:
            rows_dot_8(wt, X, m, acc)
            n = 8
        elif n >= 4:
            rows_dot_4(wt, X, m, acc)
            n = 4
        elif n >= 2:
            rows_dot_2(wt, X, m, acc)
            n = 2
        else:
            rows_dot_1(wt, X, m, acc)
        _store(acc, out, t, m, n)
        m += n


# One per kind (not a factory): numba's on-disk cache keys functions by name. `_float_range_*`
# run tiles t0..t1 given X's group sums (direct_tiles.direct_sums: computed once per product,
# not per task); `_float_tiles_*` are the one-call entries that compute them.

@njit(nogil=True, cache=True)
def _float_range_q4(codes, scale, mn, X, xs, out, t0, t1):
    if takes_direct(codes, X):
        direct_tiles(codes, scale, mn, X, xs, out, t0, t1)
    else:
        _expanded_tiles_q4(codes, scale, mn, X, out, t0, t1)


@njit(nogil=True, cache=True)
def _expanded_tiles_q4(codes, scale, mn, X, out, t0, t1):
    wt = np.empty((X.shape[1], TILE), np.float32)
    acc = np.empty((8, TILE), np.float32)
    for t in range(t0, t1):
        qmatmul._dq_tile_q4(codes, scale, mn, t, wt)
        _multiply_tile(wt, X, out, t, acc)


@njit(nogil=True, cache=True)
def _float_range_q8(codes, scale, mn, X, xs, out, t0, t1):
    if takes_direct(codes, X):
        direct_tiles(codes, scale, mn, X, xs, out, t0, t1)
    else:
        _expanded_tiles_q8(codes, scale, mn, X, out, t0, t1)


@njit(nogil=True, cache=True)
def _expanded_tiles_q8(codes, scale, mn, X, out, t0, t1):
    wt = np.empty((X.shape[1], TILE), np.float32)
    acc = np.empty((8, TILE), np.float32)
    for t in range(t0, t1):
        qmatmul._dq_tile_q8(codes, scale, mn, t, wt)
        _multiply_tile(wt, X, out, t, acc)


@njit(nogil=True, cache=True)
def _float_range_f32(codes, scale, mn, X, xs, out, t0, t1):
    acc = np.empty((8, TILE), np.float32)
    for t in range(t0, t1):
        _multiply_tile(codes[t], X, out, t, acc)


@njit(nogil=True, cache=True)
def _float_tiles_q4(codes, scale, mn, X, out, t0, t1):
    _float_range_q4(codes, scale, mn, X, direct_sums(codes, mn, X), out, t0, t1)


@njit(nogil=True, cache=True)
def _float_tiles_q8(codes, scale, mn, X, out, t0, t1):
    _float_range_q8(codes, scale, mn, X, direct_sums(codes, mn, X), out, t0, t1)


@njit(nogil=True, cache=True)
def _float_tiles_f32(codes, scale, mn, X, out, t0, t1):
    _float_range_f32(codes, scale, mn, X, X[:, :0], out, t0, t1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_q4(codes, scale, mn, X, out):
    xs = direct_sums(codes, mn, X)
    for t in prange(codes.shape[0]):
        _float_range_q4(codes, scale, mn, X, xs, out, t, t + 1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_q8(codes, scale, mn, X, out):
    xs = direct_sums(codes, mn, X)
    for t in prange(codes.shape[0]):
        _float_range_q8(codes, scale, mn, X, xs, out, t, t + 1)


@njit(nogil=True, cache=True, parallel=True)
def _float_par_f32(codes, scale, mn, X, out):
    for t in prange(codes.shape[0]):
        _float_range_f32(codes, scale, mn, X, X[:, :0], out, t, t + 1)


INTEGER = available()
FLOAT_TILES = {"q4": _float_tiles_q4, "q8": _float_tiles_q8, "f32": _float_tiles_f32}
INT_SERIAL = {"q4": _serial_q4, "q8": _serial_q8} if INTEGER else {}
_FLOAT_PAR = {"q4": _float_par_q4, "q8": _float_par_q8, "f32": _float_par_f32}
_INT_PAR = {"q4": _par_q4, "q8": _par_q8} if INTEGER else {}


def check_batch(w: PackedWeight, X: np.ndarray, out: np.ndarray) -> None:
    rows, cols = w.shape
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[1] != cols or not X.flags.c_contiguous:
        raise ValueError(f"X must be contiguous float32 of shape (M, {cols}), got {X.dtype} {X.shape}")
    if out.dtype != np.float32 or out.shape != (X.shape[0], rows):
        raise ValueError(f"out must be float32 of shape ({X.shape[0]}, {rows}), got {out.dtype} {out.shape}")


def matmul_into(w: PackedWeight, X: np.ndarray, out: np.ndarray) -> None:
    """out = X @ W.T: X float32 (M, cols), out float32 (M, rows), over numba's threads (prange
    over tiles). Each weight tile is read from memory once per call, whatever M. Integer dots
    for 2 or 3 rows where the host has them and the kind is "q4"/"q8", else float (see the
    module docstring)."""
    check_batch(w, X, out)
    if not X.shape[0]:
        return
    if w.kind in _INT_PAR:
        _INT_PAR[w.kind](w.codes, w.scale, w.min, w.group, X, out)
    else:
        _FLOAT_PAR[w.kind](w.codes, w.scale, w.min, X, out)


def matmul_float_into(w: PackedWeight, X: np.ndarray, out: np.ndarray) -> None:
    """matmul_into with float32 arithmetic only, at every M (float32-rounding accurate; what
    hosts without VNNI run)."""
    check_batch(w, X, out)
    if X.shape[0]:
        _FLOAT_PAR[w.kind](w.codes, w.scale, w.min, X, out)
