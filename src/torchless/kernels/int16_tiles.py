"""Batched products of 2 to 32 rows on 4-bit nibbles (to 16 on byte codes) with the activations in
int16: integer dot products of the codes with X, scaled per group. Opt-in:
$TORCHLESS_INT16_ACTIVATIONS=1, on hosts with AVX-512 VNNI.

Why: the float kernels (direct_tiles, and the expanded tiles of qmatmul_batch) convert every
code to float32 and do one 16-lane fused multiply-add per code and row of X. A `vpdpwssd`
multiplies 32 pairs of int16 and adds each pair into 16 int32 lanes: twice the multiply-adds of
an FMA (an Emerald Rapids core retires two of either a cycle: a scratch loop of 12 independent
chains ran 5.97 vs 5.98 G instructions/s), and a code only needs widening to 16 bits, two codes
to a 32-bit lane, instead of a conversion to float32.

Activations: each row of X is quantized per group of the weight's columns (32, or 16 for byte
codes in groups of 16) to int16, scale = the group's largest |x| / 32767, rounded to nearest.
A group's largest value, where it is over PEAK_RATIO times the next, is kept apart in float32
and added with its column's codes, so that an outlier (activations have channels 20 to 70 times
their RMS) does not coarsen its group. The integer sums are exact (|code| <= 128, 32 columns:
under 2^28); then out += scale_w * (scale_x * sum + code_peak * x_peak) + min_w * sum(x), with
nibbles taken less CENTER and min_w plus CENTER scale_w, and sum(x) in float32. A NaN or
infinity in a group makes its scale NaN, and the row's results NaN.

What it costs in accuracy, and why it is not the default: the rounding is 2^-16 of a group's
largest value, about 2e-5 of a product's size. SmolLM2's prompt logits moved from 6e-5 to
0.8-1.3e-3 of transformers' (the gate is 2e-3; the greedy continuations stay identical), but
Gemma 3's last logits reached 2.5-3.4e-5 relative against a gate of 2e-5, and the tiny random
models of tests/test_fast_path 1.3e-4 against 1e-4: gates set for float32 arithmetic. (llama.cpp's q8
activations, one int8 per value, moved SmolLM2's logits by 0.45: qmatmul_batch's docstring.)

Measured on an Emerald Rapids VM (2 vCPUs), SmolLM2 Q4_1, switch on against off:
- products, one core, us per row of X, this code (scratch `/tmp/p32/k16.py`, the kernels
  alternating in one process, the rounding of X included): 1536 x 576 at 4 rows 16.4 against
  the direct kernels' 21.4, at 8 rows 12.5 against the expanded tiles' 20.3, at 16 rows 14.0
  against 14.6; the 49152 x 576 Q8_0 head at 8 rows 540 against 644, at 16 rows 537 against 509.
  Before nibbles were summed less 8 again, 16 rows ran 11.3 against 14.5, and the limits
  MAX_ROWS_* were set then (below); they want measuring again;
- a decode step of 16 rows, before that change (scratch `/tmp/proto/b16.py 16`): 52.4-52.8 ->
  44.1-44.3 ms at 1 thread, 30.3-31.0 -> 28.2-28.3 ms at 2;
- benchmarks/bench_pipeline.py, before and after it: see benchmarks/README.md.

A row's result does not depend on the other rows of its call: every row is quantized and
summed alone, in the same order whatever block of rows it is in. One row alone keeps the direct
kernels, the matvec's arithmetic (MIN_ROWS): a sequence decoding alone gets the same bits as
without the switch.
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import INT16_ENV, INT16_REQUESTED
from .direct_tiles import _store
from .float_tiles import scale_row
from .packing import TILE, prefetch_group

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16I, _V32H, _V16F = ir.VectorType(_I32, 16), ir.VectorType(_I16, 32), ir.VectorType(ir.FloatType(), 16)
ROWS = 8  # rows of X a pass: 2 int32 accumulators each (the tile's 32 rows), 16 of 32 registers
# A group's largest |x| over PEAK_RATIO times its next is kept apart in float32. At 4 SmolLM2's
# prompt logits moved up to 1.6e-3 from transformers', at 2 up to 1.0e-3 (both measured with
# 16 rows at most), at no cost measured.
PEAK_RATIO = np.float32(2)
# Nibbles (0..15) are summed less 8, the mins taking 8 scales: the rounding error of X then
# weighs with the code's distance from the middle of its range, not with the code. SmolLM2's
# prompt logits moved 0.8-1.3e-3 from transformers' so, 1.1-1.4e-3 with codes uncentred.
CENTER = 8
_MAGNITUDE = np.int32(0x7FFFFFFF)  # the bits of |x|
_ROUND = np.float32(12582912.0)  # adding and taking off 1.5 x 2^23 rounds a float32 under 2^22 to an integer
# One row keeps the direct kernels (see the module docstring); past MAX_ROWS the expanded float
# tiles are as fast: on one core, int16 / float time per row on SmolLM2's Q4_1 shapes was
# 0.74-0.80 at 16 rows, 0.79-0.89 at 24, 0.84-0.95 at 32 and 0.90-0.99 at 48, on its Q8_0 head
# 0.94 at 16, 1.02 at 24 and 1.14 at 32 (scratch `/tmp/p32/k16b.py`)
MIN_ROWS, MAX_ROWS_NIBBLES, MAX_ROWS_BYTES = 2, 32, 16


def _target_features() -> set:
    """The instruction-set features numba compiles for: NUMBA_CPU_FEATURES when set, else the
    host's (torchless picks only a CPU model to schedule for: see kernels.tuning_cpu)."""
    if config.CPU_FEATURES:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    try:
        return {name for name, on in _llvm.get_host_cpu_features().items() if on}
    except RuntimeError:
        return set()


# Products are routed here only when asked for ($TORCHLESS_INT16_ACTIVATIONS: the rounding of X
# costs accuracy, see the module docstring) and where VNNI makes the pair products one
# instruction (where they were measured); elsewhere the float kernels take every product.
HOST_VNNI = {"avx512bw", "avx512vnni"} <= _target_features()
ENABLED = INT16_REQUESTED and HOST_VNNI
if INT16_REQUESTED and not HOST_VNNI:
    print(f"torchless: {INT16_ENV} needs AVX-512 VNNI, which this CPU lacks; using float32 activations",
          file=sys.stderr)


def _splat(builder, value, vector_type):
    """value in every lane of a vector_type."""
    undefined = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(_I32, vector_type.count),
                                                                [0] * vector_type.count))


def _dot_add(builder, acc, codes, x):
    """acc (<16 x i32>) + the pair products of codes and x (<32 x i16> each): lane i gains
    codes[2i] x[2i] + codes[2i+1] x[2i+1]. Written as generic IR (widen, multiply, add the even
    and odd lanes), which LLVM 22 turns into one vpdpwssd with AVX-512 VNNI (vpmaddwd and vpaddd
    with BW alone); the x86 intrinsics would not compile for other targets."""
    wide = ir.VectorType(_I32, 32)
    prod = builder.mul(builder.sext(codes, wide), builder.sext(x, wide))
    even, odd = (builder.shuffle_vector(prod, prod, ir.Constant(_V16I, [2 * i + k for i in range(16)]))
                 for k in (0, 1))
    return builder.add(acc, builder.add(even, odd))


def _make_dots(nibbles: bool):
    """The code of acc[i, :] += group g of tile t's products with row m0 + i of X, for i < n
    (1 to ROWS: a switch over unrolled bodies). Nibbles: byte row j holds columns j (low) and
    16 + j (high), one word of X; bytes: byte rows 2p and 2p + 1 make word p. The codes are
    widened to 32-bit lanes, the pair's first in the low half, and multiplied with the word of
    X's row (xp's row m0 + i from column w0, see prepare) into int32 sums, which are then scaled
    into acc (float32)."""

    def emit(context, builder, sig, args):
        intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
        codes_a, xp_a, sc_a, acc_a = (context.make_array(sig.args[i])(context, builder, args[i])
                                      for i in (0, 3, 7, 8))
        t_, g_, m_, n_, w_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4, 5, 6))
        n_groups, byte_rows = cgutils.unpack_tuple(builder, codes_a.shape, 4)[1:3]
        v_bytes = ir.VectorType(_I8, TILE)
        splat32 = lambda v: ir.Constant(_V16I, [v] * 16)  # noqa: E731
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")

        def code_row(j):
            p = cgutils.get_item_pointer(context, builder, sig.args[0], codes_a, [t_, g_, j, intp(0)])
            return builder.load(builder.bitcast(p, v_bytes.as_pointer()), align=1)

        def half(raw, h, extend):  # output rows 16h..16h+15 of a byte row, as 32-bit lanes
            mask = ir.Constant(_V16I, [16 * h + i for i in range(16)])
            return extend(builder.shuffle_vector(raw, raw, mask), _V16I)

        def pairs(w):  # the words of one step, per half: (low code, high code) in 16-bit halves
            if nibbles:  # (d | d << 12) & 0x000F000F: the low nibble in bits 0-3, the high in 16-19,
                raw = code_row(w)  # then each less CENTER in its 16 bits
                pair = [builder.and_(builder.or_(d, builder.shl(d, splat32(12))), splat32(0x000F000F))
                        for d in (half(raw, h, builder.zext) for h in (0, 1))]
                return [builder.sub(builder.bitcast(v, _V32H), ir.Constant(_V32H, [CENTER] * 32)) for v in pair]
            lo, hi = code_row(builder.mul(w, intp(2))), code_row(builder.add(builder.mul(w, intp(2)), intp(1)))
            return [builder.or_(builder.and_(half(lo, h, builder.sext), splat32(0xFFFF)),
                                builder.shl(half(hi, h, builder.sext), splat32(16))) for h in (0, 1)]

        def column_codes(k):  # the codes of the group's column k (nibbles less CENTER), per half
            if nibbles:  # byte row k % 16, the low nibble under 16, the high from 16
                raw = code_row(builder.and_(k, intp(15)))
                shift = builder.trunc(builder.shl(builder.lshr(k, intp(4)), intp(2)), _I8)
                raw = builder.lshr(raw, _splat(builder, shift, v_bytes))
                raw = builder.and_(raw, ir.Constant(v_bytes, [15] * TILE))
                return [builder.sub(half(raw, h, builder.zext), splat32(CENTER)) for h in (0, 1)]
            return [half(code_row(k), h, builder.sext) for h in (0, 1)]

        def int_sums(n_rows, n_words):
            """A loop over the group's words (not unrolled: unrolled, LLVM widened every code row
            first and spilled them), the sums carried in registers: [row][half] <16 x i32>."""
            x_rows = [builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[3], xp_a,
                                                               [builder.add(m_, intp(i)), w_]), _I32.as_pointer())
                      for i in range(n_rows)]
            entry = builder.block
            loop = builder.append_basic_block("int16_dots.words")
            end = builder.append_basic_block("int16_dots.words_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            w = builder.phi(intp(0).type)
            w.add_incoming(intp(0), entry)
            sums = [[builder.phi(_V16I) for _ in (0, 1)] for _ in range(n_rows)]
            for phi in (phi for row in sums for phi in row):
                phi.add_incoming(ir.Constant(_V16I, [0] * 16), entry)
            codes = [builder.bitcast(v, _V32H) for v in pairs(w)]
            new = []
            for i in range(n_rows):
                x = builder.bitcast(_splat(builder, builder.load(builder.gep(x_rows[i], [w]), align=4), _V16I), _V32H)
                new.append([_dot_add(builder, sums[i][h], codes[h], x) for h in (0, 1)])
            w_next = builder.add(w, intp(1))
            w.add_incoming(w_next, builder.block)
            for phi, value in zip((p for row in sums for p in row), (v for row in new for v in row)):
                phi.add_incoming(value, builder.block)
            builder.cbranch(builder.icmp_signed("<", w_next, intp(n_words)), loop, end)
            builder.position_at_end(end)
            return new

        def scale_into_acc(sums):
            """acc[i] += scale * (x_scale * sum + code_peak * x_peak) + min * x_sum: the group's
            scales and mins in sc's rows 8 and 9 (zeros where the weight has no mins), the peak's
            codes read only where a row's group has one kept apart."""
            def vec(ary_type, ary, row, column):
                p = cgutils.get_item_pointer(context, builder, ary_type, ary, [row, column])
                return builder.bitcast(p, _V16F.as_pointer())

            scales = [builder.load(vec(sig.args[7], sc_a, intp(8), intp(16 * h)), align=4) for h in (0, 1)]
            mins = [builder.load(vec(sig.args[7], sc_a, intp(9), intp(16 * h)), align=4) for h in (0, 1)]
            if nibbles:  # scale * code + min = scale * (code - CENTER) + (min + CENTER scale)
                center = ir.Constant(_V16F, [float(CENTER)] * 16)
                mins = [builder.call(fma, [center, scale, low]) for scale, low in zip(scales, mins)]
            for i, row_sums in enumerate(sums):
                row = builder.add(m_, intp(i))

                def xp_at(first, p_type=None):  # xp[row, first G + g]
                    p = cgutils.get_item_pointer(context, builder, sig.args[3], xp_a,
                                                 [row, builder.add(builder.mul(n_groups, intp(first)), g_)])
                    return builder.load(p if p_type is None else builder.bitcast(p, p_type))

                x_sum, x_scale, peak = _splat(builder, xp_at(0), _V16F), _splat(builder, xp_at(1), _V16F), xp_at(2)
                dots = [builder.fmul(builder.sitofp(v, _V16F), x_scale) for v in row_sums]
                without = builder.block
                with builder.if_then(builder.fcmp_unordered("!=", peak, ir.Constant(peak.type, 0.0)), likely=False):
                    k = context.cast(builder, xp_at(3, _I32.as_pointer()), types.int32, types.intp)
                    with_peak = [builder.call(fma, [builder.sitofp(c, _V16F), _splat(builder, peak, _V16F), d])
                                 for c, d in zip(column_codes(k), dots)]
                    then = builder.block
                merged = [builder.phi(_V16F) for _ in (0, 1)]  # phi nodes first in their block
                for h, dot in enumerate(merged):
                    dot.add_incoming(dots[h], without)
                    dot.add_incoming(with_peak[h], then)
                for h, dot in enumerate(merged):
                    p = vec(sig.args[8], acc_a, intp(i), intp(16 * h))
                    a = builder.call(fma, [scales[h], dot, builder.load(p, align=4)])
                    builder.store(builder.call(fma, [mins[h], x_sum, a]), p, align=4)

        done = builder.append_basic_block("int16_dots.done")
        layouts = (16,) if nibbles else (32, 16)  # byte rows per group
        by_layout = builder.switch(byte_rows, done)
        for n_bytes in layouts:
            block = builder.append_basic_block(f"int16_dots.bytes{n_bytes}")
            by_layout.add_case(intp(n_bytes), block)
            builder.position_at_end(block)
            after = builder.append_basic_block(f"int16_dots.bytes{n_bytes}.done")
            by_rows = builder.switch(n_, after)
            for n_rows in range(1, ROWS + 1):
                body = builder.append_basic_block(f"int16_dots.bytes{n_bytes}.rows{n_rows}")
                by_rows.add_case(intp(n_rows), body)
                builder.position_at_end(body)
                scale_into_acc(int_sums(n_rows, 16 if nibbles else n_bytes // 2))
                builder.branch(after)
            builder.position_at_end(after)
            builder.branch(done)
        builder.position_at_end(done)

    return emit


_EMIT = {types.uint8: _make_dots(True), types.int8: _make_dots(False)}


@intrinsic
def int16_dots(typingctx, codes, t, g, xp, m0, n, w0, sc, acc):
    """acc[:n, :TILE] += group g of tile t's products with rows m0.. of X: the integer code sums
    with X's int16 words in xp (read as 32-bit words from column w0; see prepare), scaled by
    the group's x scales and weight scales (sc[8]), plus its mins (sc[9]) times X's group sums.
    The codes' dtype picks nibbles (uint8: Q4_0, Q4_1, Q4_K) or bytes (int8: Q8_0, groups of
    32 or 16)."""
    floats = lambda a: (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"  # noqa: E731
                        and a.dtype == types.float32)
    if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C" and codes.dtype in _EMIT
            and floats(xp) and floats(sc) and floats(acc)):
        return None
    emit = _EMIT[codes.dtype]

    def codegen(context, builder, sig, args):
        emit(context, builder, sig, args)
        return context.get_dummy_value()

    return types.void(codes, t, g, xp, m0, n, w0, sc, acc), codegen


def is_nibbles(codes):
    """Whether codes are 4-bit nibbles (uint8) rather than bytes (int8), known when compiling."""


@overload(is_nibbles, inline="always")
def _is_nibbles(codes):
    nibbles = codes.dtype == types.uint8
    return lambda codes: nibbles


@njit(nogil=True, cache=True, inline="always")
def takes_int16(codes, X):
    """Whether a product runs here: the switch on (ENABLED), and MIN_ROWS to MAX_ROWS_NIBBLES rows
    of X on plain nibbles (16 byte rows per group of 32 columns) or to MAX_ROWS_BYTES on bytes in
    groups of 32 or 16."""
    if not ENABLED or X.shape[0] < MIN_ROWS:
        return False
    if is_nibbles(codes):
        return codes.shape[2] == 16 and X.shape[0] <= MAX_ROWS_NIBBLES
    return (codes.shape[2] == 32 or codes.shape[2] == 16) and X.shape[0] <= MAX_ROWS_BYTES


@njit(nogil=True, cache=True)
def prepare(codes, mn, X):
    """X (M, K) -> xp float32 (M, 4 G + K / 2), G groups of columns, per row and group: [:, :G]
    the sum of x (for the weights' mins, and the centre of nibbles); [:, G:2G] the int16 scale (NaN where the
    group holds a NaN or an infinity, so that the products do too); [:, 2G:3G] the value of
    largest magnitude, the peak, where it is over PEAK_RATIO times the next (else 0), kept in
    float32, and [:, 3G:4G] its column in the group (int32 bits), its int16 value 0; [:, 4G:]
    the int16 values as 32-bit words of two, in the pair order of int16_dots (nibbles: columns
    j and 16 + j of a group; bytes: 2p and 2p + 1).

    Each loop over a group is one that LLVM vectorizes: magnitudes compared as integer bits
    (|x|'s bits order as |x| does), int32 kept from numba's int64 promotion, the sum of x taken
    in eight lanes. Written with scalar branches it took 77.8 us for 16 rows of 1536, a third of the
    product's time; now 21.8."""
    M, K = X.shape
    G = codes.shape[1]
    width = K // G
    xp = np.zeros((M, 4 * G + K // 2), np.float32)
    words = xp.view(np.int32)
    bits = X.view(np.int32)
    q = np.empty(width, np.int32)
    lanes = np.empty(8, np.float32)
    one = np.empty(1, np.float32)  # a float from its bits
    one_bits = one.view(np.int32)
    for m in range(M):
        for g in range(G):
            c0 = g * width
            peak_bits = np.int32(0)
            for k in range(width):  # int32 throughout: numba's int64 promotion halved the vectors
                peak_bits = max(peak_bits, np.int32(bits[m, c0 + k] & _MAGNITUDE))
            if peak_bits >= 0x7F800000:  # an infinity or a NaN
                xp[m, G + g] = np.nan
                continue
            second_bits, ties = np.int32(0), np.int32(0)
            for k in range(width):
                b = np.int32(bits[m, c0 + k] & _MAGNITUDE)
                ties = np.int32(ties + np.int32(b == peak_bits))
                second_bits = max(second_bits, b if b < peak_bits else np.int32(0))
            one_bits[0] = peak_bits
            peak = one[0]
            one_bits[0] = second_bits
            second = one[0]
            top, at = peak, 0
            if ties == 1 and peak > PEAK_RATIO * second:  # the peak apart, in float32
                while (bits[m, c0 + at] & _MAGNITUDE) != peak_bits:
                    at += 1
                xp[m, 2 * G + g] = X[m, c0 + at]
                words[m, 3 * G + g] = at
                top = second
            if top > 0:
                inv = np.float32(32767.0) / top
                for k in range(width):  # rounded to nearest by 1.5 x 2^23 (np.rint did not vectorize)
                    q[k] = np.int32((X[m, c0 + k] * inv + _ROUND) - _ROUND)
                if top < peak:
                    q[at] = 0
            else:
                q[:] = 0
            xp[m, G + g] = top / np.float32(32767.0)
            lanes[:] = 0.0  # the sum of x in float32, eight lanes at a time (it vectorizes)
            for k0 in range(0, width, 8):
                for j in range(8):
                    lanes[j] += X[m, c0 + k0 + j]
            xp[m, g] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
            w0 = 4 * G + g * (width // 2)
            if is_nibbles(codes):
                for p in range(width // 2):
                    words[m, w0 + p] = (q[p] & 0xFFFF) | (q[16 + p] << 16)
            else:
                for p in range(width // 2):
                    words[m, w0 + p] = (q[2 * p] & 0xFFFF) | (q[2 * p + 1] << 16)
    return xp


@njit(nogil=True, cache=True, fastmath={"contract"})
def int16_tiles(codes, scale, mn, X, xp, out, t0, t1):
    """out[:, rows of tiles t0..t1] = X @ W.T for the tiles' rows; xp from prepare(codes, mn, X)."""
    M = X.shape[0]
    G = codes.shape[1]
    half_width = X.shape[1] // G // 2
    sc = np.zeros((10, TILE), np.float32)  # scale_row writes rows 8 (scales) and 9 (mins)
    acc = np.empty((ROWS, TILE), np.float32)
    has_min = mn.shape[1] > 0
    for t in range(t0, t1):
        m0 = 0
        while m0 < M:
            n = min(M - m0, ROWS)
            for i in range(n):
                for r in range(TILE):
                    acc[i, r] = 0.0
            for g in range(G):
                if m0 == 0:  # the next tile's group, while this one computes (see qmatmul._span_codes)
                    prefetch_group(codes, t + 1, g)
                scale_row(scale, t, g, sc, 8)
                if has_min:
                    scale_row(mn, t, g, sc, 9)
                int16_dots(codes, t, g, xp, m0, n, 4 * G + g * half_width, sc, acc)
            _store(acc, out, t, m0, n)
            m0 += n


def run_tiles(codes, scale, mn, X, xp, out, t0, t1):
    """int16_tiles where the switch is on; where it is off, nothing, and int16_tiles is never
    compiled into the float kernels that branch here (takes_int16 is then always False)."""


def prepare_x(codes, mn, X):
    """prepare where the switch is on; where it is off, never called (an empty array)."""


@overload(run_tiles, inline="always")
def _run_tiles(codes, scale, mn, X, xp, out, t0, t1):
    if ENABLED:
        return lambda codes, scale, mn, X, xp, out, t0, t1: int16_tiles(codes, scale, mn, X, xp, out, t0, t1)
    return lambda codes, scale, mn, X, xp, out, t0, t1: None


@overload(prepare_x, inline="always")
def _prepare_x(codes, mn, X):
    if ENABLED:
        return lambda codes, mn, X: prepare(codes, mn, X)
    return lambda codes, mn, X: np.empty((0, 0), np.float32)
