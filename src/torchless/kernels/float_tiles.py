"""Float32 building blocks of the batched products: expand a row of a tile's codes to float32,
and multiply an expanded tile with a block of rows of X, accumulators in registers.

Why written as LLVM IR: numba vectorizes a loop over a tile's 32 rows, but with the
accumulators in an array it loads and stores them around every multiply-add, and with a
branch or a 4-D index inside its loops it stops vectorizing the expansion of codes (Q8_0's
tiles expanded at 2 G weights/s). Here the block of X rows (8, 4, 2 or 1) keeps 2 x R vectors of
16 float32 in registers over a slice's loop of columns, each column's 32 weights are loaded
once for all R rows, and a row of codes is widened with one load, and per 16 values one
conversion and one multiply (and add of the min) (benchmarks/bench_batch_kernel.py).

Exactness: each row of X gets the same sequence of fused multiply-adds whatever block it is in,
so a row's result does not depend on how many rows are multiplied with it; the expansion is
`scale * code (+ min)` in float32, unfused, exactly as the scalar dequantizers compute it.
"""

from __future__ import annotations

from llvmlite import binding as _llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..quant import IQ4NL_VALUES
from .packing import TILE, widen_row

_F32, _I8, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
_V16 = ir.VectorType(_F32, 16)
_HALVES = TILE // 16


def _make_rows_dot(n_rows: int):
    """An intrinsic acc[m0 + i, 0:TILE] += sum_k X[m0 + i, k0 + k] * wt[k, 0:TILE] for k < cols and
    i < n_rows: wt float32 (>= cols, TILE), a slice of an expanded tile, contiguous; X float32
    (M, >= k0 + cols) and acc float32 (>= m0 + n_rows, TILE), C-contiguous. The sums start
    from acc's rows and end there: a tile multiplied slice by slice gets the same fused
    multiply-adds in the same order as in one pass. Rows past X's last (m0 + i >= M) compute
    copies of its last row into acc's spare rows: see qmatmul_batch._multiply_slice."""

    @intrinsic
    def rows_dot(typingctx, wt, X, m0, k0, cols, acc):
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2
                   and a.layout == "C" for a in (wt, X, acc)):
            return None  # the loop steps through wt and the rows of X as contiguous memory

        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            wt_a = context.make_array(sig.args[0])(context, builder, args[0])
            x_a = context.make_array(sig.args[1])(context, builder, args[1])
            acc_a = context.make_array(sig.args[5])(context, builder, args[5])
            m0_, k0_, cols = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (2, 3, 4))
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3),
                                                 "llvm.fma.v16f32")
            weights = builder.bitcast(wt_a.data, _F32.as_pointer())
            rows = [builder.add(m0_, intp(i)) for i in range(n_rows)]
            # rows of X past its last are read as its last (a block padded with copies; their
            # sums go to acc's spare rows)
            last = builder.sub(cgutils.unpack_tuple(builder, x_a.shape, 2)[0], intp(1))
            x_rows = [builder.select(builder.icmp_signed("<", r, last), r, last) for r in rows]
            xrows = [cgutils.get_item_pointer(context, builder, sig.args[1], x_a, [r, k0_]) for r in x_rows]
            sums = [builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[5], acc_a,
                                                             [r, intp(16 * h)]), _V16.as_pointer())
                    for r in rows for h in range(_HALVES)]
            start = [builder.load(p, align=4) for p in sums]
            entry = builder.block
            loop = builder.append_basic_block("rows_dot.loop")
            done = builder.append_basic_block("rows_dot.done")
            splat = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
            builder.cbranch(builder.icmp_signed(">", cols, intp(0)), loop, done)
            builder.position_at_end(loop)
            k = builder.phi(cgutils.intp_t)
            k.add_incoming(intp(0), entry)
            acc = [builder.phi(_V16) for _ in range(n_rows * _HALVES)]
            for a, s in zip(acc, start):
                a.add_incoming(s, entry)
            row = builder.mul(k, intp(TILE))
            w = [builder.load(builder.bitcast(builder.gep(weights, [builder.add(row, intp(16 * h))]),
                                              _V16.as_pointer()), align=4) for h in range(_HALVES)]
            new = []
            for i in range(n_rows):
                x = builder.load(builder.gep(xrows[i], [k]))
                xb = builder.insert_element(ir.Constant(_V16, ir.Undefined), x, ir.Constant(_I32, 0))
                xb = builder.shuffle_vector(xb, ir.Constant(_V16, ir.Undefined), splat)
                new += [builder.call(fma, [w[h], xb, acc[_HALVES * i + h]]) for h in range(_HALVES)]
            k_next = builder.add(k, intp(1))
            k.add_incoming(k_next, loop)
            for a, n in zip(acc, new):
                a.add_incoming(n, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, cols), loop, done)
            builder.position_at_end(done)
            results = [builder.phi(_V16) for _ in new]  # (all of a block's phis come first)
            for result, s, n in zip(results, start, new):
                result.add_incoming(s, entry)
                result.add_incoming(n, loop)
            for result, p in zip(results, sums):
                builder.store(result, p, align=4)
            return context.get_dummy_value()

        return types.void(wt, X, m0, k0, cols, acc), codegen

    return rows_dot


# rows_dot_<R>: R rows of X per pass over an expanded tile (2 R accumulators of 16 lanes; 8 rows
# use 16 of AVX-512's 32 vector registers, and on AVX2 spill less than 16 rows would)
rows_dot_8, rows_dot_4, rows_dot_2, rows_dot_1 = (_make_rows_dot(n) for n in (8, 4, 2, 1))


try:  # IQ4's index lookup: one pshufb per 32 codes where the host has AVX2, else a select chain
    _HOST_AVX2 = bool(_llvm.get_host_cpu_features().get("avx2", False))
except RuntimeError:
    _HOST_AVX2 = False


def _iq4_values(builder, index):
    """IQ4NL_VALUES[index] for a vector of TILE byte indices 0..15, as signed bytes."""
    v_bytes = ir.VectorType(_I8, TILE)
    levels = [int(v) for v in IQ4NL_VALUES]
    if _HOST_AVX2 and TILE == 32:  # vpshufb looks up within each 16-byte lane: the table twice
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_bytes, [v_bytes, v_bytes]),
                                            "llvm.x86.avx2.pshuf.b")
        return builder.call(fn, [ir.Constant(v_bytes, levels * 2), index])
    out = ir.Constant(v_bytes, [levels[0]] * TILE)
    for k in range(1, 16):
        out = builder.select(builder.icmp_unsigned("==", index, ir.Constant(v_bytes, [k] * TILE)),
                             ir.Constant(v_bytes, [levels[k]] * TILE), out)
    return out


def _make_expand_codes(nibbles: bool, high_bits: int = 0, lookup: bool = False):
    """An intrinsic wt[o, :] = buf[0, :] * code[t, g, j, :] + buf[1, :]: the TILE codes of
    column j of group g as float32, a row's scale and min widened into buf (zeros where the
    layout has no min: + 0.0, as the scalar dequantizers always added). With nibbles,
    "q4" codes: the low nibbles to wt[o], the high ones to wt[o + 16]; else signed bytes. With
    high_bits 1 (5-bit codes) the fifth bits come from byte 16 + j // 4 (see packing); with 2
    (Q6_K's 6-bit codes) the top two bits of the low and high nibbles from bytes 16 + j // 4 and
    20 + j // 4, the low nibbles on buf[0]'s scales and the high ones on buf[1]'s, as
    scale * (code - 32) (no min). With lookup (IQ4_NL, IQ4_XS), the nibbles index IQ4NL_VALUES:
    scale * value, no min (as gguf-py computes it)."""
    has_min = high_bits != 2 and not lookup

    @intrinsic
    def expand_codes(typingctx, codes, t, g, j, buf, wt, o):
        if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"
                and codes.dtype == (types.uint8 if nibbles else types.int8)
                and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2
                        and a.layout == "C" for a in (buf, wt))):
            return None  # rows of TILE codes, scales and weights read and written as vectors

        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            buf_a = context.make_array(sig.args[4])(context, builder, args[4])
            wt_a = context.make_array(sig.args[5])(context, builder, args[5])
            t_, g_, j_, o_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 3, 6))
            v_bytes, v_floats = ir.VectorType(_I8, TILE), ir.VectorType(_F32, TILE)
            splat = lambda v: ir.Constant(v_bytes, [v] * TILE)  # noqa: E731

            def code_row(k):
                p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, k, intp(0)])
                return builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)

            def buf_row(k):
                q = cgutils.get_item_pointer(context, builder, sig.args[4], buf_a, [intp(k), intp(0)])
                return builder.load(builder.bitcast(q, v_floats.as_pointer()), align=4)

            raw = code_row(j_)
            plain = nibbles and not high_bits and not lookup
            if plain:
                # widened to 32 bits before the nibbles are split: two byte-to-dword widenings
                # per row instead of four and the shuffles between (the loop's assembly), with
                # the same values, so the same weights. On a slice in L1 it is no faster: 1.02x
                # (0.97-1.07) expanding a 576 x 32 tile, alternating both in one process on
                # Emerald Rapids; a whole tile in L2 expanded 1.9x faster.
                v_words = ir.VectorType(_I32, TILE)
                wide = builder.zext(raw, v_words)
                codes = [builder.and_(wide, ir.Constant(v_words, [15] * TILE)),
                         builder.lshr(wide, ir.Constant(v_words, [4] * TILE))]
            elif nibbles:
                codes = [builder.and_(raw, splat(15)), builder.lshr(raw, splat(4))]
            else:
                codes = [raw]
            if high_bits:
                quad = builder.add(intp(16), builder.lshr(j_, intp(2)))
                # per-byte shift of the quad's byte of high bits: j % 4 (x 2 for two bits each)
                shift = builder.trunc(builder.mul(builder.and_(j_, intp(3)), intp(high_bits)), _I8)
                shift = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(v_bytes, ir.Undefined), shift, ir.Constant(_I32, 0)),
                    ir.Constant(v_bytes, ir.Undefined), ir.Constant(ir.VectorType(_I32, TILE), [0] * TILE))
                if high_bits == 1:
                    bits = builder.lshr(code_row(quad), shift)
                    codes = [builder.or_(codes[0], builder.shl(builder.and_(bits, splat(1)), splat(4))),
                             builder.or_(codes[1], builder.and_(bits, splat(16)))]
                else:
                    tops = [builder.lshr(code_row(builder.add(quad, intp(4 * k))), shift) for k in (0, 1)]
                    codes = [builder.or_(c, builder.shl(builder.and_(top, splat(3)), splat(4)))
                             for c, top in zip(codes, tops)]
            if lookup:
                values = [builder.sitofp(_iq4_values(builder, c), v_floats) for c in codes]
            elif plain:
                values = [builder.sitofp(c, v_floats) for c in codes]  # 0..15: vcvtdq2ps
            elif nibbles:
                values = [builder.uitofp(c, v_floats) for c in codes]
            else:
                values = [builder.sitofp(codes[0], v_floats)]
            if high_bits == 2:  # code - 32 is exact in float32
                values = [builder.fsub(v, ir.Constant(v_floats, [32.0] * TILE)) for v in values]
                scales = [buf_row(0), buf_row(1)]
            else:
                scales = [buf_row(0)] * len(values)
            mn = buf_row(1) if has_min else None
            for k, (v, scale) in enumerate(zip(values, scales)):
                w = builder.fmul(scale, v)
                if has_min:
                    w = builder.fadd(w, mn)
                q = cgutils.get_item_pointer(context, builder, sig.args[5], wt_a, [builder.add(o_, intp(16 * k)), intp(0)])
                builder.store(w, builder.bitcast(q, v_floats.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(codes, t, g, j, buf, wt, o), codegen

    return expand_codes


expand_nibbles, expand_q5, expand_q6 = (_make_expand_codes(True, bits) for bits in (0, 1, 2))
expand_bytes = _make_expand_codes(False)
expand_iq4 = _make_expand_codes(True, lookup=True)


def _fma_x(context, builder, x_type, x_a, index, values, acc):
    """acc + values * x[index] (x broadcast), one llvm.fma of TILE float32 lanes."""
    v_floats = ir.VectorType(_F32, TILE)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_floats, [v_floats] * 3),
                                         f"llvm.fma.v{TILE}f32")
    x = builder.load(cgutils.get_item_pointer(context, builder, x_type, x_a, [index]))
    xb = builder.shuffle_vector(builder.insert_element(ir.Constant(v_floats, ir.Undefined), x, ir.Constant(_I32, 0)),
                                ir.Constant(v_floats, ir.Undefined), ir.Constant(ir.VectorType(_I32, TILE), [0] * TILE))
    return builder.call(fma, [values, xb, acc])


@intrinsic
def iq4_code_sums(typingctx, codes, t, g, x, s):
    """Decode on the IQ4 layout (nibbles indexing IQ4NL_VALUES, see packing): s[0, :] = the sum
    over group g's 32 columns of IQ4NL_VALUES[index] * x[32 g + column], two accumulators
    (even and odd byte rows) summed at the end. As IR for the lookup (vpshufb)."""
    if not (_byte_codes_and_floats(codes, x, s) and x.ndim == 1 and s.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
        codes_a = context.make_array(sig.args[0])(context, builder, args[0])
        x_a = context.make_array(sig.args[3])(context, builder, args[3])
        s_a = context.make_array(sig.args[4])(context, builder, args[4])
        t_, g_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2))
        v_bytes, v_floats = ir.VectorType(_I8, TILE), ir.VectorType(_F32, TILE)
        base = builder.mul(g_, intp(32))
        acc = [ir.Constant(v_floats, [0.0] * TILE)] * 2
        for j in range(16):
            p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, intp(j), intp(0)])
            raw = builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)
            halves = [builder.and_(raw, ir.Constant(v_bytes, [15] * TILE)),
                      builder.lshr(raw, ir.Constant(v_bytes, [4] * TILE))]
            for k, index in enumerate(halves):  # columns j and j + 16
                value = builder.sitofp(_iq4_values(builder, index), v_floats)
                acc[j % 2] = _fma_x(context, builder, sig.args[3], x_a, builder.add(base, intp(j + 16 * k)),
                                    value, acc[j % 2])
        q = cgutils.get_item_pointer(context, builder, sig.args[4], s_a, [intp(0), intp(0)])
        builder.store(builder.fadd(acc[0], acc[1]), builder.bitcast(q, v_floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(codes, t, g, x, s), codegen


def _splat_bytes(builder, value):
    """A TILE-byte vector of one i8 value."""
    v_bytes = ir.VectorType(_I8, TILE)
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(v_bytes, ir.Undefined), value, ir.Constant(_I32, 0)),
        ir.Constant(v_bytes, ir.Undefined), ir.Constant(ir.VectorType(_I32, TILE), [0] * TILE))


def _low_codes(context, builder, codes_type, codes_a, t_, g_, j_, three_bit):
    """The four code vectors (i8 x TILE) of byte row j < 8 of group g in the 2- and 3-bit
    layouts (see packing): columns j + 8 i in bit pairs 2i, 2i + 1; 3-bit codes take their third
    bits from byte 8 + j // 2 (bits 4 (j % 2) + i)."""
    intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
    v_bytes = ir.VectorType(_I8, TILE)
    splat = lambda v: ir.Constant(v_bytes, [v] * TILE)  # noqa: E731

    def code_row(k):
        p = cgutils.get_item_pointer(context, builder, codes_type, codes_a, [t_, g_, k, intp(0)])
        return builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)

    raw = code_row(j_)
    codes = [builder.and_(builder.lshr(raw, splat(2 * i)), splat(3)) for i in range(4)]
    if three_bit:
        shift = builder.trunc(builder.mul(builder.and_(j_, intp(1)), intp(4)), _I8)
        high = builder.lshr(code_row(builder.add(intp(8), builder.lshr(j_, intp(1)))),
                            _splat_bytes(builder, shift))  # bit i: column j + 8 i's third bit
        codes = [builder.or_(c, builder.and_(builder.shl(high, splat(2 - i)) if i < 2 else
                                             builder.lshr(high, splat(i - 2)), splat(4)))
                 for i, c in enumerate(codes)]
    return codes


def _byte_codes_and_floats(codes, *floats):
    return (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"
            and codes.dtype == types.uint8
            and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"
                    for a in floats))


def _make_expand_low(three_bit: bool):
    """An intrinsic for the 2- and 3-bit "q4" layouts (see packing): the codes of byte row j < 8
    of group g (columns j, j + 8, j + 16, j + 24) as float32 to wt[o + 8 i, :]. The first two
    columns are on buf[0]'s scales, the last two on buf[1]'s. 2-bit codes (Q2_K) add buf[2]'s
    and buf[3]'s mins: scale * code + min; 3-bit codes (Q3_K) are scale * (code - 4), as
    gguf-py computes scale * q."""

    @intrinsic
    def expand_low(typingctx, codes, t, g, j, buf, wt, o):
        if not (_byte_codes_and_floats(codes, buf, wt) and buf.ndim == 2 and wt.ndim == 2):
            return None

        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            buf_a = context.make_array(sig.args[4])(context, builder, args[4])
            wt_a = context.make_array(sig.args[5])(context, builder, args[5])
            t_, g_, j_, o_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 3, 6))
            v_floats = ir.VectorType(_F32, TILE)

            def buf_row(k):
                q = cgutils.get_item_pointer(context, builder, sig.args[4], buf_a, [intp(k), intp(0)])
                return builder.load(builder.bitcast(q, v_floats.as_pointer()), align=4)

            codes = _low_codes(context, builder, sig.args[0], codes_a, t_, g_, j_, three_bit)
            scales = [buf_row(0), buf_row(1)]
            mins = None if three_bit else [buf_row(2), buf_row(3)]
            for i, c in enumerate(codes):
                v = builder.uitofp(c, v_floats)
                if three_bit:  # code - 4 is exact in float32
                    w = builder.fmul(scales[i // 2], builder.fsub(v, ir.Constant(v_floats, [4.0] * TILE)))
                else:
                    w = builder.fadd(builder.fmul(scales[i // 2], v), mins[i // 2])
                q = cgutils.get_item_pointer(context, builder, sig.args[5], wt_a, [builder.add(o_, intp(8 * i)), intp(0)])
                builder.store(w, builder.bitcast(q, v_floats.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(codes, t, g, j, buf, wt, o), codegen

    return expand_low


def _make_low_code_sums(three_bit: bool):
    """An intrinsic for decode on the 2- and 3-bit layouts: s[0, :] = the sum over the first 16
    columns of group g (those on its first scale) of code * x[32 g + column], s[3, :] over the
    last 16, the codes as `_low_codes` reads them (3-bit: 0..7, the kernel subtracts 4 x the
    sum of x). Written as IR because numba's own loop for 3-bit codes did not vectorize (1.6 G
    weights/s against 14-15 for 2-bit ones). Two accumulators per half, summed at the end."""

    @intrinsic
    def low_code_sums(typingctx, codes, t, g, x, s):
        if not (_byte_codes_and_floats(codes, x, s) and x.ndim == 1 and s.ndim == 2):
            return None

        def codegen(context, builder, sig, args):
            intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
            codes_a = context.make_array(sig.args[0])(context, builder, args[0])
            x_a = context.make_array(sig.args[3])(context, builder, args[3])
            s_a = context.make_array(sig.args[4])(context, builder, args[4])
            t_, g_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2))
            v_floats = ir.VectorType(_F32, TILE)
            base = builder.mul(g_, intp(32))
            acc = [ir.Constant(v_floats, [0.0] * TILE)] * 4  # half 0: i = 0, 1; half 1: i = 2, 3
            for j in range(8):
                codes = _low_codes(context, builder, sig.args[0], codes_a, t_, g_, intp(j), three_bit)
                for i, c in enumerate(codes):
                    acc[i] = _fma_x(context, builder, sig.args[3], x_a, builder.add(base, intp(j + 8 * i)),
                                    builder.uitofp(c, v_floats), acc[i])
            for row, (a, b) in ((0, acc[0:2]), (3, acc[2:4])):
                q = cgutils.get_item_pointer(context, builder, sig.args[4], s_a, [intp(row), intp(0)])
                builder.store(builder.fadd(a, b), builder.bitcast(q, v_floats.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(codes, t, g, x, s), codegen

    return low_code_sums


expand_q2, expand_q3 = _make_expand_low(False), _make_expand_low(True)
low_code_sums_q2, low_code_sums_q3 = _make_low_code_sums(False), _make_low_code_sums(True)


def scale_row(src, t, g, buf, k):
    """buf[k, :TILE] = the scales (or mins) of group g of tile t, in any of packing's encodings
    (widen_row leaves float32 ones in place, for row_value to read)."""


@overload(scale_row, inline="always")
def _scale_row_compiled(src, t, g, buf, k):
    if src.dtype == types.float32 and src.ndim == 3:
        def copy(src, t, g, buf, k):
            buf[k, :TILE] = src[t, g, :TILE]
        return copy
    return lambda src, t, g, buf, k: widen_row(src, t, g, buf, k)
