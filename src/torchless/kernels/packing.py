"""The packed form of a weight matrix: the tiled layouts the kernels of `qmatmul` read, the
repacking of every GGML type into them (NumPy, once at load), and how a kernel reads a packed
scale.

`prepare()` repacks every supported GGML type once, at load, into one of three layouts:

  "q4"  4-, 5- or 6-bit codes, packed (0.5, 0.625 or 0.75 byte/weight), groups of 32 columns:
        codes uint8 (n_tiles, n_code_groups, 16 + H, TILE); byte j < 16 of group g holds the low
        4 bits of columns 32g+j (low nibble) and 32g+16+j (high nibble), as Q4_0/Q4_1 already
        do. 5-bit codes (H = 4) keep their fifth bits in bytes 16..19, beside the nibbles of the
        same 4 bytes: bit i of byte 16+k is column 32g+4k+i's, bit 4+i column 32g+16+4k+i's
        (the kernels read codes 4 bytes at a time); 6-bit codes (H = 8) their top two bits in
        bytes 16..23: bits 2i, 2i+1 of byte 16+k are column 32g+4k+i's, of byte 20+k column
        32g+16+4k+i's. Q4_K's and Q5_K's sub-blocks are re-arranged into
        the same form. Weight = scale * code + min. Used by Q4_0 (min = -8 d), Q4_1 (min = m),
        Q4_K (scale = d sc_j, min = -dmin m_j), with fifth bits by Q5_0 (min = -16 d), Q5_1 and
        Q5_K, and with sixth bits by Q6_K, whose scales change every 16 columns (group 16: the
        low nibbles of a code group have one scale, the high nibbles the next; code 0..63,
        min = -32 scale; its dequantization computes scale * (code - 32), as gguf-py does).
        2- and 3-bit codes (Q2_K, Q3_K; group 16) take 8 or 12 bytes per group of 32 columns
        (the third dimension, 16 + H above, tells the layouts apart): byte j < 8 holds columns
        32g+j, +8, +16, +24 in bits 0-1, 2-3, 4-5, 6-7 (columns j and j+8 on the group's first
        scale, j+16 and j+24 on the second); Q3_K's third bits are in bytes 8..11: bit 4h+i of
        byte 8+k is column 32g+(2k+h)+8i's. Q2_K: code 0..3, scale d sc_j, min -dmin m_j. Q3_K:
        code 0..7 (gguf-py's -4..3 plus 4), weight = scale * (code - 4), no min kept (the
        kernels subtract 4 x the group's sum of x; 0.4 byte/weight would grow by a third).
        IQ4_NL and IQ4_XS keep their 4-bit indices into IQ4NL_VALUES as nibbles, and a 17th
        byte row of zeros per group marks the layout (the kernels look each index up; the
        mark costs 1/16 of the codes): weight = scale * IQ4NL_VALUES[index], no min.
  "q8"  signed 8-bit codes (1 byte/weight): codes int8 (n_tiles, n_groups, G, TILE), G = 32 or
        16. Used by Q8_0 (G=32) and the rarer types.
  "f32" float32 (n_tiles, cols, TILE). Used by F32, and F16/BF16, which are converted to float32
        at load (twice their file size in memory; they are small or rare in quantized files).

scale/min come in three encodings, all read by the kernels through `widen_row` / `row_value`:
  float16 bits, uint16 (n_tiles, n_groups, TILE): where the file's scales are float16 values
        (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, TQ1_0, TQ2_0);
  two levels, int8 (n_tiles, n_super, 4 + G, TILE), G = groups per 256 columns: the K types and
        IQ4_XS multiply a float16 super-block scale by a small integer sub-scale per group, as
        the file does: [t, s, 0:4, :] is the float32 super-block scale of the tile's 32 rows (128
        bytes), [t, s, 4 + j, :] the int8 sub-scale of group G s + j. A group's scale is their
        product, computed as the kernel reads it. Q2_K's 4-bit sub-scales (and mins) are kept
        two to a byte, uint8 (n_tiles, n_super, 4 + G / 2, TILE): group G s + j's in the low
        (j even) or high (j odd) nibble of [t, s, 4 + j // 2, :] (a byte each would make Q2_K
        1.24x its file);
  float32 (n_tiles, n_groups, TILE) otherwise (the IQ1/2/3 lattice types).
Decode reads every weight byte once per token, so the scales' width is both memory and speed:
float16 makes a Q4_1 weight 0.625 byte, as in the file, instead of 0.75; two levels make Q4_K's
scale and min 0.047 byte per weight instead of 0.25 (packed Q4_K is 1.06x its file, not 1.33x),
six-bit codes Q6_K's weight 0.906 byte instead of 1.078 (1.10x its file, not 1.31x), and 2- and
3-bit codes Q2_K's and Q3_K's 1.05x and 1.06x their file (a byte per code: 3.5x and 2.5x).
Every value scale*code+min equals the dequantized weight of gguf-py exactly (a float16 times a
small integer is exact in float32, and two levels compute the same float32 product as gguf-py).
Rows are padded to a multiple of TILE with zero codes and zero scales.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# the bit-unpacking helpers and level tables of the newer block types (shared with quant.py's
# dequantizers, so the repack and the oracle-tested dequantization read blocks the same way)
from ..quant import (IQ_GROUP, MXFP4_VALUES, iq4_xs_scales, iq_codes, mxfp4_half_scale,
                     q3_k_codes, q3_k_scales, tq1_0_codes)

TILE = 32  # rows per tile: the vector width of the inner loop (4 x 8 float32 lanes on AVX2)

# ggml type ids (quant.GGMLType values, as plain ints)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4 = 10, 11, 20, 23, 34, 35, 39
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M = 16, 17, 18, 19, 21, 22, 29
_IQ_GROUP = {int(t): g for t, g in IQ_GROUP.items()}  # lattice types: columns per scale
_TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
               Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", BF16: "BF16",
               Q2_K: "Q2_K", Q3_K: "Q3_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS",
               TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", MXFP4: "MXFP4", IQ2_XXS: "IQ2_XXS", IQ2_XS: "IQ2_XS",
               IQ3_XXS: "IQ3_XXS", IQ1_S: "IQ1_S", IQ3_S: "IQ3_S", IQ2_S: "IQ2_S", IQ1_M: "IQ1_M"}
QK_K = 256

# The types whose scales (and mins) are float16 values in the file, kept as float16 bits unless a
# tensor's are not (Q4_0's min is -8 d, which overflows float16 when |d| > 8188).
F16_SCALE_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, TQ1_0, TQ2_0})
# The types kept as "q4" codes with a fifth (and sixth) bit per column: the bytes of high bits
# after the 16 of nibbles in a group of 32 columns (see the module docstring).
HIGH_BIT_BYTES = {Q5_0: 4, Q5_1: 4, Q5_K: 4, Q6_K: 8}
# The "q4" types with 2- or 3-bit codes: bytes per group of 32 columns (see the module docstring).
LOW_BIT_BYTES = {Q2_K: 8, Q3_K: 12}
# The "q4" types whose nibbles index IQ4NL_VALUES, and their bytes per group (the 17th marks them).
LOOKUP_TYPES = frozenset({IQ4_NL, IQ4_XS})
LOOKUP_BYTES = 17
# The types whose scales (and mins) are a float16 super-block scale times an integer sub-scale
# per group: kept in two levels (see the module docstring).
TWO_LEVEL_TYPES = frozenset({Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_XS})
# The two-level types whose 4-bit sub-scales are kept two to a byte.
NIBBLE_SUBSCALE_TYPES = frozenset({Q2_K})


def code_bytes(ggml_type: int) -> int:
    """Bytes per group of 32 columns of a "q4" type's codes (the third dimension of its codes)."""
    if ggml_type in LOOKUP_TYPES:
        return LOOKUP_BYTES
    return LOW_BIT_BYTES.get(ggml_type, 16 + HIGH_BIT_BYTES.get(ggml_type, 0))


try:  # widening float16 in a kernel wants F16C (every AVX2 x86 has it); without, float32 scales
    _HOST_F16C = bool(_llvm.get_host_cpu_features().get("f16c", False))
except RuntimeError:
    _HOST_F16C = False


@intrinsic
def _widen_f16_tile_row(typingctx, src, t, g, dst, k):
    """dst[k, 0:TILE] = src[t, g, 0:TILE] widened from float16 bits, written as vector IR (one
    load, `fpext <TILE x half>`, one store: vcvtph2ps). Per element, LLVM gathered the uint16
    loads one by one, which cost 10-40% of a product."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint16 and src.ndim == 3
            and isinstance(dst, types.Array) and dst.dtype == types.float32 and dst.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        src_a = context.make_array(sig.args[0])(context, builder, args[0])
        dst_a = context.make_array(sig.args[3])(context, builder, args[3])
        t_, g_, k_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4))
        zero = context.get_constant(types.intp, 0)
        p = cgutils.get_item_pointer(context, builder, sig.args[0], src_a, [t_, g_, zero])
        q = cgutils.get_item_pointer(context, builder, sig.args[3], dst_a, [k_, zero])
        bits = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(16), TILE).as_pointer()), align=2)
        wide = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), TILE)),
                             ir.VectorType(ir.FloatType(), TILE))
        builder.store(wide, builder.bitcast(q, ir.VectorType(ir.FloatType(), TILE).as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(src, t, g, dst, k), codegen


@intrinsic
def _widen_two_level_row(typingctx, src, t, sb, j, dst, k):
    """dst[k, 0:TILE] = float32 super-block scales src[t, sb, 0:4, :] times the sub-scales of
    group j (see the module docstring), as vector IR: two loads, a conversion, `fmul`. int8 src:
    src[t, sb, 4 + j, :]; uint8 src (two to a byte): the low (j even) or high (j odd) nibble
    of src[t, sb, 4 + j // 2, :]."""
    if not (isinstance(src, types.Array) and src.dtype in (types.int8, types.uint8) and src.ndim == 4
            and isinstance(dst, types.Array) and dst.dtype == types.float32 and dst.ndim == 2):
        return None
    nibbles = src.dtype == types.uint8

    def codegen(context, builder, sig, args):
        src_a = context.make_array(sig.args[0])(context, builder, args[0])
        dst_a = context.make_array(sig.args[4])(context, builder, args[4])
        t_, sb_, j_, k_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 3, 5))
        intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
        byte = builder.add(builder.lshr(j_, intp(1)) if nibbles else j_, intp(4))
        pd = cgutils.get_item_pointer(context, builder, sig.args[0], src_a, [t_, sb_, intp(0), intp(0)])
        ps = cgutils.get_item_pointer(context, builder, sig.args[0], src_a, [t_, sb_, byte, intp(0)])
        q = cgutils.get_item_pointer(context, builder, sig.args[4], dst_a, [k_, intp(0)])
        vf, vb = ir.VectorType(ir.FloatType(), TILE), ir.VectorType(ir.IntType(8), TILE)
        d = builder.load(builder.bitcast(pd, vf.as_pointer()), align=4)
        sub = builder.load(builder.bitcast(ps, vb.as_pointer()), align=1)
        if nibbles:
            shift = builder.trunc(builder.mul(builder.and_(j_, intp(1)), intp(4)), ir.IntType(8))
            shift = builder.shuffle_vector(builder.insert_element(ir.Constant(vb, ir.Undefined), shift,
                                                                  ir.Constant(ir.IntType(32), 0)),
                                           ir.Constant(vb, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE))
            sub = builder.uitofp(builder.and_(builder.lshr(sub, shift), ir.Constant(vb, [15] * TILE)), vf)
        else:
            sub = builder.sitofp(sub, vf)
        builder.store(builder.fmul(d, sub), builder.bitcast(q, vf.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(src, t, sb, j, dst, k), codegen


@intrinsic
def prefetch_row(typingctx, arr, t, g, nbytes):
    """Ask for the cache lines of arr[t, g, ...] (nbytes of them, from its first element) with
    llvm.prefetch, for the kernels to fetch the next tile while they compute this one. A
    prefetch is a hint: past the array's end it does nothing (it never faults)."""
    if not (isinstance(arr, types.Array) and arr.ndim >= 2 and isinstance(nbytes, types.IntegerLiteral)):
        return None
    lines = -(-nbytes.literal_value // 64)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        t_, g_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2))
        zero = context.get_constant(types.intp, 0)
        p = cgutils.get_item_pointer(context, builder, sig.args[0], a, [t_, g_] + [zero] * (sig.args[0].ndim - 2))
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8")
        base = builder.bitcast(p, i8p)
        for k in range(lines):  # read, keep in all levels, data
            builder.call(fn, [builder.gep(base, [ir.Constant(ir.IntType(64), 64 * k)]),
                              ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                              ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()
    return types.none(arr, t, g, nbytes), codegen


_GROUP_LINES = 16  # cache lines of the widest group: 32 byte rows x TILE bytes


@intrinsic
def prefetch_group(typingctx, codes, t, g):
    """prefetch_row of all of codes[t, g] (byte rows x TILE bytes, up to 1 KiB), its size read
    at run time: a jump into a chain of prefetches, so that one kernel serves every layout of
    its codes' dtype without a branch over them (a kernel that branches into calls pays numba's
    reference counting: see qmatmul._span_q4)."""
    if not (isinstance(codes, types.Array) and codes.ndim == 4 and codes.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        t_, g_ = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2))
        zero = context.get_constant(types.intp, 0)
        p = cgutils.get_item_pointer(context, builder, sig.args[0], a, [t_, g_, zero, zero])
        shape = cgutils.unpack_tuple(builder, a.shape, 4)
        nbytes = builder.mul(builder.mul(shape[2], shape[3]),
                             context.get_constant(types.intp, context.get_abi_sizeof(
                                 context.get_data_type(sig.args[0].dtype))))
        lines = builder.udiv(builder.add(nbytes, context.get_constant(types.intp, 63)),
                             context.get_constant(types.intp, 64))
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8")
        base = builder.bitcast(p, i8p)
        # block k issues line k - 1, then falls to block k - 1: entering at block `lines` issues
        # lines - 1 .. 0; more than _GROUP_LINES enters at the top
        blocks = {k: builder.append_basic_block(f"prefetch_group.{k}") for k in range(_GROUP_LINES, 0, -1)}
        done = builder.append_basic_block("prefetch_group.done")
        switch = builder.switch(lines, blocks[_GROUP_LINES])
        switch.add_case(context.get_constant(types.intp, 0), done)
        for k, block in blocks.items():
            switch.add_case(context.get_constant(types.intp, k), block)
            builder.position_at_end(block)
            builder.call(fn, [builder.gep(base, [ir.Constant(ir.IntType(64), 64 * (k - 1))]),
                              ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                              ir.Constant(ir.IntType(32), 1)])
            builder.branch(blocks[k - 1] if k > 1 else done)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return types.none(codes, t, g), codegen


def prefetch_scales(src, t, g):
    """prefetch_row of a scale or min row src[t, g, :] (float16 or float32); nothing for two-level
    scales (384 bytes per tile and 256 columns: the hardware prefetcher keeps up)."""


@overload(prefetch_scales, inline="always")
def _prefetch_scales_compiled(src, t, g):
    if src.ndim == 3:
        return lambda src, t, g: prefetch_row(src, t, g, 64)
    return lambda src, t, g: None


# A packed scale or min row (src[t, g, :]) is read in two steps, so that no kernel makes an array
# view per group (numba reference-counts each view with atomics: that cost 30-100% of a small
# product): widen_row(src, t, g, buf, k) widens float16 bits into buf[k, :] (and does nothing
# for float32), then row_value(src, t, g, r, buf, k) is element r as float32, from buf or src.

def widen_row(src, t, g, buf, k):
    if src.dtype == np.uint16:
        buf[k, :TILE] = src[t, g, :TILE].view(np.float16)
    elif src.ndim == 4 and src.dtype == np.uint8:  # sub-scales two to a byte
        sb, j = divmod(g, 2 * (src.shape[2] - 4))
        d = np.ascontiguousarray(src[t, sb, :4]).view(np.float32).reshape(TILE)
        buf[k, :TILE] = d * ((src[t, sb, 4 + j // 2] >> (4 * (j % 2))) & 15).astype(np.float32)
    elif src.ndim == 4:
        sb, j = divmod(g, src.shape[2] - 4)
        d = np.ascontiguousarray(src[t, sb, :4]).view(np.float32).reshape(TILE)
        buf[k, :TILE] = d * src[t, sb, 4 + j].astype(np.float32)


def row_value(src, t, g, r, buf, k):
    return np.float32(buf[k, r]) if src.dtype == np.uint16 or src.ndim == 4 else np.float32(src[t, g, r])


@overload(widen_row, inline="always")
def _widen_row_compiled(src, t, g, buf, k):
    if src.dtype == types.uint16:
        return lambda src, t, g, buf, k: _widen_f16_tile_row(src, t, g, buf, k)
    if src.ndim == 4:
        per_byte = 2 if src.dtype == types.uint8 else 1  # sub-scales per byte

        def widen_two_level(src, t, g, buf, k):
            per_block = per_byte * (src.shape[2] - 4)
            _widen_two_level_row(src, t, g // per_block, g % per_block, buf, k)
        return widen_two_level
    return lambda src, t, g, buf, k: None


@overload(row_value, inline="always")
def _row_value_compiled(src, t, g, r, buf, k):
    if src.dtype == types.uint16 or src.ndim == 4:
        return lambda src, t, g, r, buf, k: buf[k, r]
    return lambda src, t, g, r, buf, k: src[t, g, r]


class PackedWeight:
    """A weight matrix repacked for the kernels here; build it with `prepare()`.

    shape: (rows, cols); ggml_type: the type it came from; kind: "q4", "q8" or "f32";
    nbytes: bytes resident (codes + scales + mins, padding included).
    """

    __slots__ = ("ggml_type", "shape", "kind", "group", "codes", "scale", "min", "nbytes")

    def __init__(self, ggml_type, shape, kind, group, codes, scale, mn):
        self.ggml_type = int(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        self.kind = kind
        self.group = group
        self.codes = codes
        self.scale = scale
        self.min = mn
        self.nbytes = int(codes.nbytes + scale.nbytes + mn.nbytes)  # read per decode step: kept

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    def __repr__(self) -> str:
        name = _TYPE_NAMES.get(self.ggml_type, str(self.ggml_type))
        return f"PackedWeight({name} as {self.kind}, shape={self.shape}, {self.nbytes} bytes)"


# --------------------------------------------------------------------------------------------
# Repacking (NumPy, once at load)
# --------------------------------------------------------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins (as gguf-py),
    int8."""
    s = s.reshape(s.shape[:-1] + (3, 4))
    d, m, m_d = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.int8), mn.astype(np.int8)


def _decode(ggml_type: int, raw: np.ndarray, cols: int):
    """Raw rows (n, row_bytes) uint8 -> (codes, scale, min, kind, group), NumPy row-major:
    codes (n, cols) small ints (or float32 for "f32"), scale/min (n, cols // group) float32, or
    for TWO_LEVEL_TYPES a pair (super-block scales (n, cols // 256) float32, sub-scales
    (n, cols // group) int8) whose products are the scales."""
    n = raw.shape[0]
    if ggml_type == F32:
        return np.ascontiguousarray(raw).view(np.float32).reshape(n, cols), None, None, "f32", cols
    if ggml_type == F16:
        return np.ascontiguousarray(raw).view(np.float16).reshape(n, cols).astype(np.float32), None, None, "f32", cols
    if ggml_type == BF16:
        u = np.ascontiguousarray(raw).view(np.uint16).reshape(n, cols).astype(np.uint32) << 16
        return u.view(np.float32), None, None, "f32", cols
    if ggml_type in (Q4_0, Q4_1):
        head = 2 if ggml_type == Q4_0 else 4
        b = raw.reshape(n, cols // 32, head + 16)
        d = _f16(b[..., 0:2])
        mn = -8.0 * d if ggml_type == Q4_0 else _f16(b[..., 2:4])
        qs = b[..., head:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, groups, 32)
        return codes.reshape(n, cols), d, mn.astype(np.float32), "q4", 32
    if ggml_type in (Q5_0, Q5_1):
        head = 2 if ggml_type == Q5_0 else 4
        b = raw.reshape(n, cols // 32, head + 4 + 16)
        d = _f16(b[..., 0:2])
        qh = np.unpackbits(b[..., head:head + 4], axis=-1, bitorder="little")  # bit i: column i
        qs = b[..., head + 4:]
        q = (np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (qh << 4)).astype(np.int8)  # 0..31
        mn = np.float32(-16.0) * d if ggml_type == Q5_0 else _f16(b[..., 2:4])  # d (q - 16), d q + m
        return q.reshape(n, cols), d, mn, "q4", 32
    if ggml_type == Q8_0:
        b = raw.reshape(n, cols // 32, 34)
        return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, cols), _f16(b[..., 0:2]), None, "q8", 32
    if ggml_type in (Q4_K, Q5_K):
        nb = cols // QK_K
        b = raw.reshape(n, nb, -1)
        sc, m = _k_scale_min(b[..., 4:16])  # per 32-group: scale d sc_j, min -dmin m_j
        scale, mn = (_f16(b[..., 0:2]), sc.reshape(n, -1)), (_f16(b[..., 2:4]), -m.reshape(n, -1))
        if ggml_type == Q4_K:
            qs = b[..., 16:].reshape(n, nb, 4, 1, 32)
            codes = (qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F  # (n, nb, 4, 2, 32)
            return codes.reshape(n, cols), scale, mn, "q4", 32
        qh = b[..., 16:48].reshape(n, nb, 1, 32)
        qs = b[..., 48:].reshape(n, nb, 4, 1, 32)
        lo = ((qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F).reshape(n, nb, 8, 32)
        hi = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # (n, nb, 8, 32)
        return (lo | (hi << 4)).astype(np.int8).reshape(n, cols), scale, mn, "q4", 32
    if ggml_type == Q2_K:  # weight = (d sc_j) q - dmin m_j per 16 columns
        nb = cols // QK_K
        b = raw.reshape(n, nb, 84)
        sc = b[..., :16].reshape(n, -1)  # sub-scales two to a byte: the file's sc_j | m_j << 4
        pairs = lambda v: v[:, 0::2] | (v[:, 1::2] << np.uint8(4))  # noqa: E731
        scale = (_f16(b[..., 80:82]), pairs(sc & np.uint8(0x0F)))
        with np.errstate(invalid="ignore"):  # -dmin m_j: the same bits as -(dmin m_j)
            mn = (-_f16(b[..., 82:84]), pairs(sc >> np.uint8(4)))
        qs = b[..., 16:80].reshape(n, nb, 2, 1, 32)  # column 128 h + 32 k + j: byte 32 h + j >> 2k
        q = (qs >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03
        return q.reshape(n, cols), scale, mn, "q4", 16
    if ggml_type == Q3_K:  # weight = (d (sc_j - 32)) q per 16 columns, code = q + 4
        nb = cols // QK_K
        b = raw.reshape(n * nb, 110)
        scale = (_f16(b[:, 108:110]).reshape(n, nb), q3_k_scales(b[:, 96:108]).reshape(n, -1))
        codes = (q3_k_codes(b[:, :32], b[:, 32:96]) + np.int8(4)).view(np.uint8)
        return codes.reshape(n, cols), scale, None, "q4", 16
    if ggml_type in (IQ4_NL, IQ4_XS):  # weight = scale * IQ4NL_VALUES[index] per 32 columns
        head = 2 if ggml_type == IQ4_NL else 8
        b = raw.reshape(n, -1, head + 16) if ggml_type == IQ4_NL else raw.reshape(n * (cols // QK_K), 136)
        qs = b[..., head:].reshape(b.shape[:-1] + (-1, 16))  # per 32 columns: 16 bytes, low nibbles first
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, cols)  # the indices
        d = _f16(b[..., 0:2])
        if ggml_type == IQ4_NL:
            return codes, d, None, "q4", 32
        return codes, (d.reshape(n, -1), iq4_xs_scales(b[:, 2:8]).reshape(n, -1)), None, "q4", 32
    if ggml_type in (TQ1_0, TQ2_0):  # weight = d q, q in -1..1; d per 256 columns, kept per 32
        b = raw.reshape(n * (cols // QK_K), -1)
        if ggml_type == TQ1_0:
            q = tq1_0_codes(b)
        else:  # column 128 h + 32 k + j: bits 2k of byte 32 h + j
            q = ((b[:, :64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03)
            q = q.astype(np.int8) - np.int8(1)
        d = np.repeat(_f16(b[:, -2:]), QK_K // 32)
        return q.reshape(n, cols), d.reshape(n, -1), None, "q8", 32
    if ggml_type == MXFP4:  # weight = 2^(e-127) value[index] = 2^(e-128) (2 value[index])
        b = raw.reshape(n, cols // 32, 17)
        qs = b[..., 1:]
        codes = MXFP4_VALUES[np.concatenate([qs & 0x0F, qs >> 4], axis=-1)].reshape(n, cols)
        return codes, mxfp4_half_scale(b[..., 0]), None, "q8", 32
    if ggml_type in _IQ_GROUP:  # weight = scale * code, decoded as quant.py dequantizes
        codes, scale = iq_codes(ggml_type, raw.reshape(n * (cols // QK_K), -1))
        return codes.reshape(n, cols), scale.reshape(n, -1), None, "q8", _IQ_GROUP[ggml_type]
    if ggml_type == Q6_K:
        nb = cols // QK_K
        b = raw.reshape(n, nb, 210)
        ql, qh = b[..., :128], b[..., 128:192]
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(n, -1)
        lo = (ql.reshape(n, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F
        lo = lo.reshape(n, nb, 2, 2, 2, 32)  # (half, nibble, 32-chunk of the 64, 32)
        hi = (qh.reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
        hi = hi.reshape(n, nb, 2, 4, 32)
        # within a 128-half, gguf-py's 32-chunk k = 2*nibble + (chunk of the 64 ql bytes) takes
        # its high bits from qh shifted by 2k
        lo = lo.reshape(n, nb, 2, 4, 32)
        q = lo | (hi << 4)  # 0..63: weight = d sc_j (q - 32), kept as scale q + min
        d = _f16(b[..., 208:210])
        with np.errstate(invalid="ignore"):  # NaN scales stay NaN
            return q.reshape(n, cols), (d, sc), (np.float32(-32.0) * d, sc), "q4", 16
    raise ValueError(f"qmatmul: unsupported ggml type {ggml_type}")


def packed_layout(ggml_type: int, cols: int) -> tuple[str, int, bool]:
    """(kind, group, has_min) of a type's packed form: which kernels run it, the columns that
    share a scale, and whether a min term is kept."""
    t = int(ggml_type)
    kinds = {F32: "f32", F16: "f32", BF16: "f32", Q4_0: "q4", Q4_1: "q4", Q4_K: "q4",
             Q5_0: "q4", Q5_1: "q4", Q8_0: "q8", Q5_K: "q4", Q6_K: "q4",
             Q2_K: "q4", Q3_K: "q4", IQ4_NL: "q4", IQ4_XS: "q4", TQ1_0: "q8", TQ2_0: "q8", MXFP4: "q8",
             **{t: "q8" for t in _IQ_GROUP}}
    if t not in kinds:
        raise ValueError(f"qmatmul: unsupported ggml type {t}")
    kind = kinds[t]
    if kind == "f32":
        group = cols
    else:
        group = 16 if t in (Q2_K, Q3_K, Q6_K) else _IQ_GROUP.get(t, 32)
    return kind, group, kind == "q4" and t != Q3_K and t not in LOOKUP_TYPES


def packed_nbytes(ggml_type: int, shape) -> int:
    """What `prepare` will hold for a weight of this type and shape, without repacking it."""
    rows, cols = (int(v) for v in shape)
    kind, group, has_min = packed_layout(ggml_type, cols)
    tiles = -(-rows // TILE)
    if kind == "f32":
        return tiles * cols * TILE * 4
    if kind == "q4":
        n_code_bytes = tiles * (cols // 32) * code_bytes(int(ggml_type)) * TILE
    else:
        n_code_bytes = tiles * cols * TILE
    if int(ggml_type) in TWO_LEVEL_TYPES:  # per 256 columns: 4 bytes, and a byte (or half) per group
        per_block = QK_K // group // (2 if int(ggml_type) in NIBBLE_SUBSCALE_TYPES else 1)
        per_scale = tiles * (cols // QK_K) * (4 + per_block) * TILE
    else:  # as prepare keeps them (real files)
        per_scale = tiles * (cols // group) * TILE * (2 if int(ggml_type) in F16_SCALE_TYPES and _HOST_F16C else 4)
    return n_code_bytes + per_scale * (2 if has_min else 1)


def _f16_exact(a: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool((a.astype(np.float16).astype(np.float32).view(np.uint32) == a.view(np.uint32)).all())


def _f16_bits(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float16).view(np.uint16)


def _pad_rows(a, pad: int):
    """Rows of zeros below a (n, ...) array, or below each array of a two-level pair."""
    if a is None or not pad:
        return a
    if isinstance(a, tuple):
        return tuple(_pad_rows(b, pad) for b in a)
    return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])


def _tiled_scales(s, nt: int) -> np.ndarray:
    """Per-row scales (nt * TILE, groups) -> (nt, groups, TILE); a two-level pair (super-block
    scales (rows, n_super), sub-scales (rows, groups) int8, or uint8 two to a byte) -> int8 (or
    uint8) (nt, n_super, 4 + bytes of sub-scales per super-block, TILE)."""
    if not isinstance(s, tuple):
        return s.reshape(nt, TILE, -1).transpose(0, 2, 1)
    top, sub = s
    n_super = top.shape[1]
    top = np.ascontiguousarray(top.astype(np.float32).reshape(nt, TILE, n_super).transpose(0, 2, 1))
    top = top.view(sub.dtype).reshape(nt, n_super, 4, TILE)  # float32 bytes: 4 rows of TILE
    sub = sub.reshape(nt, TILE, n_super, -1).transpose(0, 2, 3, 1)
    return np.concatenate([top, sub], axis=2)


def prepare(qtensor) -> PackedWeight:
    """Repack a 2-D weight (`.ggml_type`, `.shape` (rows, cols), `.data` uint8 (rows, row_bytes))
    into the tiled layout of this module. Copies: the result does not keep the mapped file alive."""
    t = int(qtensor.ggml_type)
    rows, cols = (int(v) for v in qtensor.shape)
    raw = np.asarray(qtensor.data).reshape(rows, -1)
    if raw.dtype != np.uint8:
        raise ValueError("qmatmul.prepare: data must be uint8 raw bytes")
    n_tiles = -(-rows // TILE)
    kind, group, has_min = packed_layout(t, cols)
    n_groups = cols // group
    if kind == "f32":
        codes = np.zeros((n_tiles, cols, TILE), np.float32)
    elif kind == "q4":
        codes = np.zeros((n_tiles, cols // 32, code_bytes(t), TILE), np.uint8)
    else:
        codes = np.zeros((n_tiles, n_groups, group, TILE), np.int8)
    if t in NIBBLE_SUBSCALE_TYPES:
        scale = np.zeros((n_tiles, cols // QK_K, 4 + QK_K // group // 2, TILE), np.uint8)
    elif t in TWO_LEVEL_TYPES:
        scale = np.zeros((n_tiles, cols // QK_K, 4 + QK_K // group, TILE), np.int8)
    else:
        scale = np.zeros((n_tiles, n_groups if kind != "f32" else 0, TILE), np.float32)
    mn = np.zeros_like(scale)
    step = 64 * TILE  # rows decoded at a time: bounds the temporaries of _decode
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        c, s, m, _, _ = _decode(t, raw[r0:r1], cols)
        pad = (-(r1 - r0)) % TILE
        c, s, m = (_pad_rows(a, pad) for a in (c, s, m))
        t0, nt = r0 // TILE, c.shape[0] // TILE
        if kind == "f32":
            codes[t0:t0 + nt] = c.reshape(nt, TILE, cols).transpose(0, 2, 1)
            continue
        if kind == "q4":
            ng = cols // 32
            c = c.reshape(nt, TILE, ng, 32).astype(np.uint8)
            planes = [(c[..., :16] & 0x0F) | ((c[..., 16:] & 0x0F) << 4)]  # byte j: column j, j + 16
            if t in LOW_BIT_BYTES:  # byte j: bits 2i, 2i + 1 of column j + 8 i; Q3_K's third bits after
                quads = c.reshape(nt, TILE, ng, 4, 8)
                planes = [np.bitwise_or.reduce((quads & 3) << np.array([0, 2, 4, 6], np.uint8).reshape(4, 1), axis=3)]
                if t == Q3_K:  # bit 4 h + i of byte 8 + k: column 2 k + h + 8 i
                    b = (quads >> 2).transpose(0, 1, 2, 4, 3).reshape(nt, TILE, ng, 4, 8)
                    planes.append(np.packbits(b, axis=-1, bitorder="little")[..., 0])
            elif t in LOOKUP_TYPES:  # the 17th byte row: the layout's mark
                planes.append(np.zeros((nt, TILE, ng, 1), np.uint8))
            elif HIGH_BIT_BYTES.get(t) == 4:  # byte 16 + k: the fifth bits of columns 4k.. (low), 16 + 4k..
                b = (c >> 4).reshape(nt, TILE, ng, 2, 4, 4).transpose(0, 1, 2, 4, 3, 5)
                planes.append(np.packbits(b.reshape(nt, TILE, ng, 4, 8), axis=-1, bitorder="little")[..., 0])
            elif HIGH_BIT_BYTES.get(t) == 8:  # byte 16 + k (20 + k): bits 4-5 of columns 4k.. (16 + 4k..)
                top = (c >> 4).reshape(nt, TILE, ng, 8, 4) << np.array([0, 2, 4, 6], np.uint8)
                planes.append(np.bitwise_or.reduce(top, axis=-1))
            codes[t0:t0 + nt] = np.concatenate(planes, axis=-1).transpose(0, 2, 3, 1)
        else:
            codes[t0:t0 + nt] = c.reshape(nt, TILE, n_groups, group).transpose(0, 2, 3, 1)
        scale[t0:t0 + nt] = _tiled_scales(s, nt)
        if m is not None:
            mn[t0:t0 + nt] = _tiled_scales(m, nt)
    if not has_min:
        mn = np.zeros((n_tiles, 0, TILE), np.float32)  # the kernels skip the min term
    if t in F16_SCALE_TYPES and _HOST_F16C and _f16_exact(scale) and _f16_exact(mn):
        scale, mn = _f16_bits(scale), _f16_bits(mn)
    return PackedWeight(t, (rows, cols), kind, group, codes, scale, mn)
