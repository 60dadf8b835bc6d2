"""Batched products of 1 to 4 rows of X on 4-, 5-, 6-bit ("q4") and byte ("q8") codes, without
expanding the weights: each code row is converted to float32 in registers and multiplied with
the rows of X at once, and the group's scale (and min) is applied to the group's sum.

Why: the float kernels of qmatmul_batch expand every 32-row tile to float32 (scale * code +
min, stored to a buffer in L2) once per call, then multiply it with the rows of X. Under about
5 rows the expansion is most of the work, and the integer kernels that ran 2 and 3 rows
before these (see qmatmul_batch) paid three int8 levels per activation. Here the codes are converted without their scale, summed per group of 32 columns
for every row of X, and only then scaled: sum_k x_k (s c_k + m) = s sum_k x_k c_k + m sum_k x_k.
Measured on one core (AMD EPYC Zen 4; `python benchmarks/bench_batch_kernel.py --threads 1
--m 1,2,3,4,5 --shapes Q4_1:1536x576,Q8_0:49152x576,Q5_0:2048x640`, random weights, us per
row of X, medians of 5 rounds), this kernel against the expanded float tiles and the integer
kernel: SmolLM2's Q4_1 1536 x 576 at 1 row 55.3 / 84.3 / 56.5, 2 rows 31.0 / 43.6 / 41.4, 3 rows 26.9 / 40.1 / 43.2, 4
rows 25.9 / 29.2 / 30.2, 5 rows (a block of 4 and one of 1) 29.4 / 29.9 / 35.8; its Q8_0 head
49152 x 576 at 2 rows 1362 / 2282 / 1433, 3 rows 1184 / 1906 / 1881, 4 rows 1092 / 1374 / 1431,
5 rows 1192 / 1328 / 1636 (1 row 1983 / 4480 / 2082); Gemma 3 270M's Q5_0 2048 x 640 at 2 rows 50.0 / 80.3 / 60.9, 4 rows
40.6 / 51.0 / 46.1, 5 rows 46.7 / 50.0 / 56.1. At 7 and 8 rows (run as two or three blocks)
the expanded tiles were 1.1-1.2x faster than this kernel, at 16 rows 1.3x: from
DIRECT_MAX_ROWS rows the expansion is paid back.

Exactness: every row of X gets the same sequence of operations whichever block of 4, 3, 2 or
1 rows it is in (two chains of fused multiply-adds per group, even and odd byte rows, added, then
scaled), so within 1..4 rows a row's result does not depend on the rows beside it. It rounds
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
from .packing import TILE, prefetch_group

_FM = {"contract"}
_F32, _I8, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
DIRECT_MAX_ROWS = 5  # from this many rows of X, the expanded float kernels (see the module docstring)


def _make_code_sums(nibbles: bool, n_bytes: int, high_bits: int = 0):
    """The code of s[i, :] = sum over group g's columns of code[:, column] * X[m0 + i, column]
    for i < n (1 to 4: a switch over four unrolled bodies), the TILE codes of a column converted
    to float32 in registers. Nibbles: byte row j < 16 holds columns 32 g + j (low nibble) and 32 g + 16 + j (high), unsigned; with
    high_bits 1 their fifth bits are in byte 16 + j // 4 (bits j % 4 and 4 + j % 4), with 2
    (Q6_K) their top two bits in bytes 16 + j // 4 and 20 + j // 4 (bits 2 (j % 4), + 1: see
    packing), the code taken as code - 32, and the two halves of 16 columns, on scales of their
    own, summed apart: the high half into s[4 + i]. Else byte row j is column n_bytes g + j,
    signed. Two accumulators per row of X (even and odd byte rows, or the halves: one chain of
    4-cycle fused multiply-adds per row would leave a lone row waiting)."""

    def emit(context, builder, sig, args):
        intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
        codes_a = context.make_array(sig.args[0])(context, builder, args[0])
        x_a = context.make_array(sig.args[3])(context, builder, args[3])
        s_a = context.make_array(sig.args[6])(context, builder, args[6])
        t_, g_, m_, n_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4, 5))
        v_bytes, v_floats = ir.VectorType(_I8, TILE), ir.VectorType(_F32, TILE)
        splat = lambda v: ir.Constant(v_bytes, [v] * TILE)  # noqa: E731
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_floats, [v_floats] * 3),
                                             f"llvm.fma.v{TILE}f32")
        base = builder.mul(g_, intp(32 if nibbles else n_bytes))

        def rows_body(n_rows):
            x_rows = [cgutils.get_item_pointer(context, builder, sig.args[3], x_a, [base] if sig.args[3].ndim == 1
                                               else [builder.add(m_, intp(i)), base]) for i in range(n_rows)]

            def x_splat(i, column):
                x = builder.load(builder.gep(x_rows[i], [intp(column)]))
                return builder.shuffle_vector(
                    builder.insert_element(ir.Constant(v_floats, ir.Undefined), x, ir.Constant(_I32, 0)),
                    ir.Constant(v_floats, ir.Undefined), ir.Constant(ir.VectorType(_I32, TILE), [0] * TILE))

            def code_row(j):
                p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, intp(j), intp(0)])
                return builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)

            acc = [[ir.Constant(v_floats, [0.0] * TILE)] * 2 for _ in range(n_rows)]
            for j in range(n_bytes):
                raw = code_row(j)
                if nibbles:
                    low, high = builder.and_(raw, splat(15)), builder.lshr(raw, splat(4))
                    if high_bits == 1:
                        bits = builder.lshr(code_row(16 + j // 4), splat(j % 4))
                        low = builder.or_(low, builder.shl(builder.and_(bits, splat(1)), splat(4)))
                        high = builder.or_(high, builder.and_(bits, splat(16)))
                    elif high_bits == 2:
                        tops = [builder.lshr(code_row(16 + 4 * k + j // 4), splat(2 * (j % 4))) for k in (0, 1)]
                        low, high = (builder.or_(c, builder.shl(builder.and_(top, splat(3)), splat(4)))
                                     for c, top in zip((low, high), tops))
                    columns = [(j, builder.uitofp(low, v_floats)), (j + 16, builder.uitofp(high, v_floats))]
                else:
                    columns = [(j, builder.sitofp(raw, v_floats))]
                for half, (column, values) in enumerate(columns):
                    chain = half if high_bits == 2 else j % 2
                    if high_bits == 2:  # code - 32 is exact in float32
                        values = builder.fsub(values, ir.Constant(v_floats, [32.0] * TILE))
                    for i in range(n_rows):
                        acc[i][chain] = builder.call(fma, [values, x_splat(i, column), acc[i][chain]])

            def store(row, value):
                q = cgutils.get_item_pointer(context, builder, sig.args[6], s_a, [intp(row), intp(0)])
                builder.store(value, builder.bitcast(q, v_floats.as_pointer()), align=4)

            for i in range(n_rows):
                if high_bits == 2:
                    store(i, acc[i][0])
                    store(4 + i, acc[i][1])
                else:
                    store(i, builder.fadd(acc[i][0], acc[i][1]))

        done = builder.append_basic_block("code_sums.done")
        switch = builder.switch(n_, done)
        for n_rows in (1,) if sig.args[3].ndim == 1 else (1, 2, 3, 4):  # a vector x: one row
            block = builder.append_basic_block(f"code_sums.rows{n_rows}")
            switch.add_case(intp(n_rows), block)
            builder.position_at_end(block)
            rows_body(n_rows)
            builder.branch(done)
        builder.position_at_end(done)

    return emit


# per layout, by the codes' dtype and byte rows per group
_LAYOUTS = {types.uint8: {16: _make_code_sums(True, 16), 20: _make_code_sums(True, 16, 1),
                          24: _make_code_sums(True, 16, 2)},
            types.int8: {32: _make_code_sums(False, 32), 16: _make_code_sums(False, 16)}}


@intrinsic
def code_sums(typingctx, codes, t, g, X, m0, n, s):
    """s[:n] = group g's code sums of rows m0.. of X (see _make_code_sums); X may be a vector
    (the matvec: m0 0, n 1). The codes' dtype picks nibbles or bytes when compiling, their byte
    rows per group the layout when running.

    One intrinsic, called from direct_tiles' own body rather than through inlined helpers:
    numba binds an inlined function's arguments as new variables, and where the helper
    branches (by layout, by rows) it keeps the references it takes for them, a call of
    NRT_incref / NRT_decref (an atomic add) each, six per group. That was a third of the
    time of a one-row product (SmolLM2's 1536 x 576 Q4_1 on one core of an Emerald Rapids VM:
    67-98 us with them, 45-58 without, three alternating runs)."""
    floats = lambda a, dims: (isinstance(a, types.Array) and a.dtype == types.float32  # noqa: E731
                              and a.ndim in dims and a.layout == "C")
    if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"
            and codes.dtype in _LAYOUTS and floats(X, (1, 2)) and floats(s, (2,))):
        return None  # code rows, rows of X and of s read and written as contiguous memory
    layouts = _LAYOUTS[codes.dtype]

    def codegen(context, builder, sig, args):
        codes_a = context.make_array(sig.args[0])(context, builder, args[0])
        byte_rows = cgutils.unpack_tuple(builder, codes_a.shape, 4)[2]
        done = builder.append_basic_block("code_sums.layout_done")
        switch = builder.switch(byte_rows, done)
        for n_bytes, emit in layouts.items():
            block = builder.append_basic_block(f"code_sums.bytes{n_bytes}")
            switch.add_case(context.get_constant(types.intp, n_bytes), block)
            builder.position_at_end(block)
            emit(context, builder, sig, args)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(codes, t, g, X, m0, n, s), codegen


@njit(nogil=True, cache=True, inline="always")
def takes_direct(codes, X):
    """Whether a product runs here: 1 to 4 rows of X on 4-bit nibbles (16 byte rows per group:
    Q4_0, Q4_1, Q4_K), 5- and 6-bit codes (20 and 24: Q5_0, Q5_1, Q5_K, Q6_K) or byte codes in
    groups of 32 or 16 (int8: Q8_0 and the types converted to it). The 2- and 3-bit and IQ4
    layouts keep the expanded tiles."""
    return 1 <= X.shape[0] < DIRECT_MAX_ROWS and codes.shape[2] in (16, 20, 24, 32)


@njit(nogil=True, cache=True)
def direct_sums(codes, mn, X):
    """What direct_tiles reads as xs for a product that runs here (else (M, 0)). Q6_K's codes
    are taken as code - 32 and need none (its kept min, -32 scale, is the matvec's)."""
    if not takes_direct(codes, X) or codes.shape[2] == 24:
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


@njit(nogil=True, cache=True)
def _store(acc, out, t, m0, n):
    base = t * TILE
    for i in range(n):
        for r in range(base, min(out.shape[1], base + TILE)):
            out[m0 + i, r] = acc[i, r - base]


@njit(nogil=True, cache=True, fastmath=_FM)
def direct_tiles(codes, scale, mn, X, xs, out, t0, t1):
    """out[:, rows of tiles t0..t1]: 4-, 5- and 6-bit nibbles (uint8 codes) or byte codes in
    groups of 32 or 16 (int8); xs from direct_sums. Every helper here is an intrinsic or a
    single statement (see code_sums); the scale loops are one multiply-add per statement (see
    qmatmul._span_codes)."""
    s = np.empty((10, TILE), np.float32)  # sums of 4 rows of X (Q6_K: 2 x 4), the scales, the mins
    acc = np.empty((4, TILE), np.float32)
    six_bit = codes.shape[2] == 24
    has_min = mn.shape[1] > 0 and not six_bit
    for t in range(t0, t1):
        m0 = 0
        while m0 < X.shape[0]:
            n = min(X.shape[0] - m0, 4)
            for i in range(n):
                for r in range(TILE):
                    acc[i, r] = 0.0
            for g in range(codes.shape[1]):
                if m0 == 0:  # the next tile's group, while this one computes (see qmatmul._span_codes)
                    prefetch_group(codes, t + 1, g)
                code_sums(codes, t, g, X, m0, n, s)
                if six_bit:  # the halves of 16 columns on scale groups 2 g and 2 g + 1
                    scale_row(scale, t, 2 * g, s, 8)
                    scale_row(scale, t, 2 * g + 1, s, 9)
                    for i in range(n):
                        for r in range(TILE):
                            a = acc[i, r] + s[8, r] * s[i, r]
                            acc[i, r] = a + s[9, r] * s[4 + i, r]
                    continue
                scale_row(scale, t, g, s, 8)
                if has_min:
                    scale_row(mn, t, g, s, 9)
                    for i in range(n):
                        xg = xs[m0 + i, g]
                        for r in range(TILE):
                            a = acc[i, r] + s[8, r] * s[i, r]
                            acc[i, r] = a + s[9, r] * xg
                else:
                    for i in range(n):
                        for r in range(TILE):
                            acc[i, r] += s[8, r] * s[i, r]
            _store(acc, out, t, m0, n)
            m0 += n
