"""Batched products of 2 to 4 rows of X on 4-bit ("q4") and byte ("q8") codes, without
expanding the weights: each code row is converted to float32 in registers and multiplied with
the rows of X at once, and the group's scale (and min) is applied to the group's sum.

Why: the float kernels of qmatmul_batch expand every 32-row tile to float32 (scale * code +
min, stored to a buffer in L2) once per call, then multiply it with the rows of X. Under about
5 rows the expansion is most of the work, and the integer kernels pay three int8 levels per
activation. Here the codes are converted without their scale, summed per group of 32 columns
for every row of X, and only then scaled: sum_k x_k (s c_k + m) = s sum_k x_k c_k + m sum_k x_k.
Measured on one core (AMD EPYC Zen 4; `python benchmarks/bench_batch_kernel.py --threads 1 --m
2,3,4,5,6,7,8`, random weights, us per row of X, medians of 5 rounds), this kernel against the
expanded float tiles and the integer kernel: SmolLM2's 1536 x 576 Q4_1 at 2 rows 32.6 / 44.7 /
40.1, 3 rows 37.7 / 39.8 / 45.4, 4 rows 31.2 / 35.5 / 41.5, 5 rows 29.5 / 30.0 / 38.1, 7 rows
30.0 / 26.4 / 37.0; its 49152 x 576 Q8_0 head at 2 rows 1424 / 2271 / 1419, 3 rows 1557 / 1896 /
1890, 4 rows 1142 / 1409 / 1446, 7 rows 1303 / 1163 / 1629. From 5 rows the expansion is paid
back and the expanded tiles are as fast or faster: DIRECT_MAX_ROWS.

Exactness: every row of X gets the same sequence of operations whichever block of 4, 2 or 1
rows it is in (two chains of fused multiply-adds per group, even and odd byte rows, added, then
scaled), so within 2..4 rows a row's result does not depend on the rows beside it. It rounds
differently from the expanded tiles (a float32 sum of the codes times x, then the scale,
instead of a sum of dequantized weights times x): a row multiplied with 3 others and with 4
others can differ in the last bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .float_tiles import scale_row
from .packing import TILE, prefetch_row

_FM = {"contract"}
_F32, _I8, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
DIRECT_MAX_ROWS = 5  # from this many rows of X, the expanded float kernels (see the module docstring)


def _make_code_sums(n_rows: int, nibbles: bool, n_bytes: int):
    """An intrinsic s[i, :] = sum over group g's columns of code[:, column] * X[m0 + i, column]
    for i < n_rows, the TILE codes of a column converted to float32 in registers. Nibbles: byte
    row j < 16 holds columns 32 g + j (low nibble) and 32 g + 16 + j (high), unsigned; else byte
    row j is column n_bytes g + j, signed. Two accumulators per row of X (even and odd byte
    rows: one chain of 4-cycle fused multiply-adds per row would leave a lone row waiting)."""

    @intrinsic
    def code_sums(typingctx, codes, t, g, X, m0, s):
        if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"
                and codes.dtype == (types.uint8 if nibbles else types.int8)
                and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2
                        and a.layout == "C" for a in (X, s))):
            return None  # code rows, rows of X and of s read and written as contiguous memory

        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            x_a = context.make_array(sig.args[3])(context, builder, args[3])
            s_a = context.make_array(sig.args[5])(context, builder, args[5])
            t_, g_, m_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4))
            v_bytes, v_floats = ir.VectorType(_I8, TILE), ir.VectorType(_F32, TILE)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_floats, [v_floats] * 3),
                                                 f"llvm.fma.v{TILE}f32")
            base = builder.mul(g_, intp(32 if nibbles else n_bytes))
            x_rows = [cgutils.get_item_pointer(context, builder, sig.args[3], x_a, [builder.add(m_, intp(i)), base])
                      for i in range(n_rows)]

            def x_splat(i, column):
                x = builder.load(builder.gep(x_rows[i], [intp(column)]))
                return builder.shuffle_vector(
                    builder.insert_element(ir.Constant(v_floats, ir.Undefined), x, ir.Constant(_I32, 0)),
                    ir.Constant(v_floats, ir.Undefined), ir.Constant(ir.VectorType(_I32, TILE), [0] * TILE))

            acc = [[ir.Constant(v_floats, [0.0] * TILE)] * 2 for _ in range(n_rows)]
            for j in range(n_bytes):
                p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, intp(j), intp(0)])
                raw = builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)
                if nibbles:
                    columns = [(j, builder.uitofp(builder.and_(raw, ir.Constant(v_bytes, [15] * TILE)), v_floats)),
                               (j + 16, builder.uitofp(builder.lshr(raw, ir.Constant(v_bytes, [4] * TILE)), v_floats))]
                else:
                    columns = [(j, builder.sitofp(raw, v_floats))]
                for column, values in columns:
                    for i in range(n_rows):
                        acc[i][j % 2] = builder.call(fma, [values, x_splat(i, column), acc[i][j % 2]])
            for i in range(n_rows):
                q = cgutils.get_item_pointer(context, builder, sig.args[5], s_a, [intp(i), intp(0)])
                builder.store(builder.fadd(acc[i][0], acc[i][1]), builder.bitcast(q, v_floats.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(codes, t, g, X, m0, s), codegen

    return code_sums


nibble_sums_4, nibble_sums_2, nibble_sums_1 = (_make_code_sums(n, True, 16) for n in (4, 2, 1))
byte32_sums_4, byte32_sums_2, byte32_sums_1 = (_make_code_sums(n, False, 32) for n in (4, 2, 1))
byte16_sums_4, byte16_sums_2, byte16_sums_1 = (_make_code_sums(n, False, 16) for n in (4, 2, 1))


@njit(nogil=True, cache=True, inline="always")
def takes_direct(codes, X):
    """Whether a product runs here: 2 to 4 rows of X on 4-bit nibbles (16 byte rows per group:
    Q4_0, Q4_1, Q4_K) or byte codes in groups of 32 or 16 (int8: Q8_0 and the types converted to
    it). The 2-, 3-, 5- and 6-bit and IQ4 layouts keep their kernels."""
    return 2 <= X.shape[0] < DIRECT_MAX_ROWS and codes.shape[2] in (16, 32)


@njit(nogil=True, cache=True)
def direct_sums(codes, mn, X):
    """What direct_tiles_* read as xs for a product that runs here (else (M, 0))."""
    if not takes_direct(codes, X):
        return np.empty((X.shape[0], 0), np.float32)
    return x_group_sums(codes, mn, X)


@njit(nogil=True, cache=True)
def x_group_sums(codes, mn, X):
    """Each row of X summed per group of columns, (M, groups), for the min term; (M, 0) for
    weights without mins. Once per product, not per tile."""
    M = X.shape[0]
    if mn.shape[1] == 0:
        return np.empty((M, 0), np.float32)
    group = X.shape[1] // codes.shape[1]
    xs = np.empty((M, codes.shape[1]), np.float32)
    for m in range(M):
        for g in range(xs.shape[1]):
            a = np.float32(0.0)
            for j in range(group):
                a += X[m, g * group + j]
            xs[m, g] = a
    return xs


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _scale_into(acc, s, xs, m0, n, g, has_min):
    """acc[i] += scale * s[i] (+ min * the group's sum of x) for i < n; scale in s[4], min in
    s[5]. One multiply-add per statement (see qmatmul._tile_q4)."""
    for i in range(n):
        if has_min:
            xg = xs[m0 + i, g]
            for r in range(TILE):
                a = acc[i, r] + s[4, r] * s[i, r]
                acc[i, r] = a + s[5, r] * xg
        else:
            for r in range(TILE):
                acc[i, r] += s[4, r] * s[i, r]


@njit(nogil=True, cache=True)
def _store(acc, out, t, m0, n):
    base = t * TILE
    for i in range(n):
        for r in range(base, min(out.shape[1], base + TILE)):
            out[m0 + i, r] = acc[i, r - base]


# One per kind (not a factory): numba's on-disk cache keys functions by name.

@njit(nogil=True, cache=True, fastmath=_FM)
def direct_tiles_q4(codes, scale, mn, X, xs, out, t0, t1):
    """out[:, rows of tiles t0..t1] for 4-bit nibbles; xs from x_group_sums."""
    s = np.empty((6, TILE), np.float32)  # sums of 4 rows of X, the scales, the mins
    acc = np.empty((4, TILE), np.float32)
    has_min = mn.shape[1] > 0
    for t in range(t0, t1):
        m0 = 0
        while m0 < X.shape[0]:
            n = min(4, X.shape[0] - m0)
            n = 4 if n == 4 else (2 if n >= 2 else 1)
            acc[:n] = 0.0
            for g in range(codes.shape[1]):
                if m0 == 0:  # the next tile's group, while this one computes (see qmatmul._tile_q4)
                    prefetch_row(codes, t + 1, g, 512)
                if n == 4:
                    nibble_sums_4(codes, t, g, X, m0, s)
                elif n == 2:
                    nibble_sums_2(codes, t, g, X, m0, s)
                else:
                    nibble_sums_1(codes, t, g, X, m0, s)
                scale_row(scale, t, g, s, 4)
                if has_min:
                    scale_row(mn, t, g, s, 5)
                _scale_into(acc, s, xs, m0, n, g, has_min)
            _store(acc, out, t, m0, n)
            m0 += n


@njit(nogil=True, cache=True, fastmath=_FM)
def direct_tiles_q8(codes, scale, mn, X, xs, out, t0, t1):
    """out[:, rows of tiles t0..t1] for byte codes (groups of 32 or 16); xs from x_group_sums."""
    s = np.empty((6, TILE), np.float32)
    acc = np.empty((4, TILE), np.float32)
    has_min = mn.shape[1] > 0
    wide = codes.shape[2] == 32
    for t in range(t0, t1):
        m0 = 0
        while m0 < X.shape[0]:
            n = min(4, X.shape[0] - m0)
            n = 4 if n == 4 else (2 if n >= 2 else 1)
            acc[:n] = 0.0
            for g in range(codes.shape[1]):
                if m0 == 0:
                    prefetch_row(codes, t + 1, g, 1024)
                if wide:
                    if n == 4:
                        byte32_sums_4(codes, t, g, X, m0, s)
                    elif n == 2:
                        byte32_sums_2(codes, t, g, X, m0, s)
                    else:
                        byte32_sums_1(codes, t, g, X, m0, s)
                elif n == 4:
                    byte16_sums_4(codes, t, g, X, m0, s)
                elif n == 2:
                    byte16_sums_2(codes, t, g, X, m0, s)
                else:
                    byte16_sums_1(codes, t, g, X, m0, s)
                scale_row(scale, t, g, s, 4)
                if has_min:
                    scale_row(mn, t, g, s, 5)
                _scale_into(acc, s, xs, m0, n, g, has_min)
            _store(acc, out, t, m0, n)
            m0 += n
