"""ggml's tensor types: block layouts, dequantization, and QTensor (a tensor as stored in a file).

Every type is a table row (elements per block, bytes per block) and, if supported, a function
from an (n_blocks, type_size) uint8 array to (n_blocks, block_size) float32, vectorised over
blocks. The arithmetic follows gguf-py's `gguf/quants.py` step for step (scales are widened from
float16 to float32 first, then multiplied in the same order), so results match it bit for bit.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

from .errors import UnsupportedModelError, shown

QK_K = 256  # elements per super-block of the k-quants


class GGMLType(IntEnum):
    """ggml's numeric type ids, as stored in GGUF tensor infos."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (elements per block, bytes per block), for the supported types only.
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
    GGMLType.TQ1_0: (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),
    GGMLType.TQ2_0: (QK_K, QK_K // 4 + 2),
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.IQ2_XXS: (QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ3_XXS: (QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
}


# (elements per block, bytes per block) of every known type, supported or not (from ggml's
# type_traits): enough to size and list any tensor of a file, e.g. for `torchless inspect`.
STORAGE_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    **BLOCK_LAYOUT,
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q8_K: (QK_K, 292), GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8), GGMLType.F64: (1, 8),
}

# Byte offsets of the float16 scales (d, and m or dmin) within a block of each quantized type.
_F16_SCALE_OFFSETS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.IQ4_NL: (0,),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.IQ4_XS: (0,),
    GGMLType.TQ1_0: (52,), GGMLType.TQ2_0: (64,),  # MXFP4's power-of-two scale is always finite
    GGMLType.IQ2_XXS: (0,), GGMLType.IQ2_XS: (0,), GGMLType.IQ2_S: (0,), GGMLType.IQ3_XXS: (0,),
    GGMLType.IQ3_S: (0,), GGMLType.IQ1_S: (0,),  # IQ1_M's d is spread over 4 nibbles: not listed
}
_F16_EXPONENT = 0x7C00  # all ones: infinity or NaN


def supported_type(type_id: int, tensor_name: str | None = None) -> GGMLType:
    """The supported GGMLType for `type_id`, or UnsupportedModelError naming it (and the tensor)."""
    if type_id in BLOCK_LAYOUT:
        return GGMLType(type_id)
    try:
        name = GGMLType(type_id).name
    except ValueError:
        name = "unknown"
    where = f"tensor {shown(tensor_name)}: " if tensor_name is not None else ""
    raise UnsupportedModelError(f"{where}quantization type {name} ({int(type_id)}) is not supported; "
                                f"supported: {', '.join(t.name for t in BLOCK_LAYOUT)}")


# -- dequantizers: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ----------------

def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32: a block's float16 scale, widened as gguf-py does."""
    return b.view(np.float16).astype(np.float32)


def _bits(q: np.ndarray, group: int, shifts, mask: int) -> np.ndarray:
    """Unpack bit fields: each run of `group` bytes yields len(shifts) runs of `group` values."""
    n = q.shape[0]
    shifts = np.array(shifts, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((q.reshape(n, -1, 1, group) >> shifts) & np.uint8(mask)).reshape(n, -1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 (n, 8, 1)."""
    n = s.shape[0]
    d, m, md = s.reshape(n, 3, 4).transpose(1, 0, 2)  # bytes 0-3, 4-7, 8-11
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32).reshape(n, 8, 1), mn.astype(np.float32).reshape(n, 8, 1)


def _q4_0(b):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return d * (_bits(qs, 16, [0, 4], 0x0F).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(b):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return d * _bits(qs, 16, [0, 4], 0x0F).astype(np.float32) + m


def _q5_high(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes (a little-endian uint32) -> its 32 bits, bit i for element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q5_0(b):
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    q = (_bits(qs, 16, [0, 4], 0x0F) | (_q5_high(qh) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _q5_1(b):
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    q = (_bits(qs, 16, [0, 4], 0x0F) | (_q5_high(qh) << np.uint8(4))).astype(np.float32)
    return (d * q) + m


def _q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _q2_k(b):
    n = b.shape[0]
    sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _bits(b[:, 16:80], 32, [0, 2, 4, 6], 0x03).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: the 12 scale bytes (..., 12) -> 16 six-bit scales minus 32, int8 (..., 16): scale i
    has its low nibble in byte i % 8 (low half first) and its high 2 bits in byte 8 + i % 4 at
    bit 2 (i // 4)."""
    s = s.reshape(-1, 12)
    lo = _bits(s[:, :8], 8, [0, 4], 0x0F)
    hi = _bits(s[:, 8:], 4, [0, 2, 4, 6], 0x03)
    return (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)


def q3_k_codes(hmask: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q3_K: hmask (n, 32) and qs (n, 64) -> the 256 codes, int8 (n, 256) in -4..3: 2 low bits
    from qs, minus 4 where the element's hmask bit is 0."""
    ql = _bits(qs, 32, [0, 2, 4, 6], 0x03).astype(np.int8)
    qh = _bits(hmask, 32, range(8), 0x01) ^ np.uint8(1)
    return ql - (qh << np.uint8(2)).astype(np.int8)


def _q3_k(b):
    n = b.shape[0]
    dl = (_f16(b[:, 108:110]) * q3_k_scales(b[:, 96:108]).astype(np.float32)).reshape(n, 16, 1)
    q = q3_k_codes(b[:, :32], b[:, 32:96]).reshape(n, 16, 16).astype(np.float32)
    return (dl * q).reshape(n, QK_K)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]).reshape(n, 1, 1), _f16(b[:, 2:4]).reshape(n, 1, 1)
    sc, mn = _k_scales(b[:, 4:16])
    q = _bits(b[:, 16:], 32, [0, 4], 0x0F).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc) * q - dmin * mn).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]).reshape(n, 1, 1), _f16(b[:, 2:4]).reshape(n, 1, 1)
    sc, mn = _k_scales(b[:, 4:16])
    qh = _bits(b[:, 16:48], 32, range(8), 0x01)
    q = (_bits(b[:, 48:], 32, [0, 4], 0x0F) | (qh << np.uint8(4))).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc) * q - dmin * mn).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:])
    dl = (d * scales.view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    q = (_bits(ql, 64, [0, 4], 0x0F) | (_bits(qh, 32, [0, 2, 4, 6], 0x03) << np.uint8(4)))
    q = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (dl * q).reshape(n, QK_K)


# IQ4_NL/IQ4_XS: a 4-bit index selects one of these 16 non-linear levels (ggml's kvalues_iq4nl)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _iq4_nl(b):
    return _f16(b[:, :2]) * IQ4NL_VALUES[_bits(b[:, 2:], 16, [0, 4], 0x0F)].astype(np.float32)


def iq4_xs_scales(b: np.ndarray) -> np.ndarray:
    """IQ4_XS: the 6 scale bytes (n, 6) (a uint16 of 8 high 2-bit parts, then 4 bytes of
    8 low nibbles) -> the 8 six-bit scales minus 32 of a super-block's 32-groups, int8 (n, 8)."""
    n = b.shape[0]
    hi = np.ascontiguousarray(b[:, :2]).view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)
    lo = b[:, 2:6].reshape(n, 4, 1) >> np.array([0, 4], np.uint8)
    ls = (lo.reshape(n, 8) & np.uint8(0x0F)) | ((hi & np.uint16(3)).astype(np.uint8) << np.uint8(4))
    return ls.astype(np.int8) - np.int8(32)


def _iq4_xs(b):
    n = b.shape[0]
    dl = (_f16(b[:, :2]) * iq4_xs_scales(b[:, 2:8]).astype(np.float32)).reshape(n, 8, 1)
    q = IQ4NL_VALUES[_bits(b[:, 8:], 16, [0, 4], 0x0F)].astype(np.float32).reshape(n, 8, 32)
    return (dl * q).reshape(n, QK_K)


def tq1_0_codes(b: np.ndarray) -> np.ndarray:
    """TQ1_0: (n, 54) blocks -> the 256 ternary codes -1..1, int8 (n, 256). Bytes hold 5 (the
    last 4: 4) base-3 digits as a fixed-point fraction: digit k of byte x is (x 3^k mod 256) 3 >> 8."""
    n = b.shape[0]
    pow3 = np.array([1, 3, 9, 27, 81], np.uint8).reshape(5, 1)
    parts = [(b[:, :32].reshape(n, 1, 32) * pow3).reshape(n, -1),  # uint8 products wrap, as meant
             (b[:, 32:48].reshape(n, 1, 16) * pow3).reshape(n, -1),
             (b[:, 48:52].reshape(n, 1, 4) * pow3[:4]).reshape(n, -1)]
    q = np.concatenate(parts, axis=-1)
    return ((q.astype(np.uint16) * 3) >> 8).astype(np.int8) - np.int8(1)


def _tq1_0(b):
    return _f16(b[:, 52:54]) * tq1_0_codes(b).astype(np.float32)


def _tq2_0(b):
    q = _bits(b[:, :64], 32, [0, 2, 4, 6], 0x03).astype(np.int8) - np.int8(1)
    return _f16(b[:, 64:66]) * q.astype(np.float32)


# MXFP4: a 4-bit index selects an e2m1 value; stored doubled here (0.5 is folded into the scale)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def mxfp4_half_scale(e: np.ndarray) -> np.ndarray:
    """MXFP4: the e8m0 scale byte e -> 2^(e - 127) / 2 as float32 (subnormal for e < 2)."""
    e = e.astype(np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).view(np.float32)


def _mxfp4(b):
    return mxfp4_half_scale(b[:, :1]) * MXFP4_VALUES[_bits(b[:, 1:], 16, [0, 4], 0x0F)].astype(np.float32)


# -- the lattice ("IQ") types: codes into a grid, with sign bits and 4-bit (3-bit) scales ---------

# IQ2_XXS/IQ2_XS/IQ3_XXS: a 7-bit sign index selects 8 sign bits of even parity (ggml's ksigns)
_KSIGNS = np.array([i | (bin(i).count("1") & 1) << 7 for i in range(128)], np.uint8)
IQ_GROUP = {GGMLType.IQ2_XXS: 32, GGMLType.IQ2_XS: 16, GGMLType.IQ2_S: 16, GGMLType.IQ3_XXS: 32,
            GGMLType.IQ3_S: 32, GGMLType.IQ1_S: 32, GGMLType.IQ1_M: 16}  # columns per scale


def _sign_bits(s: np.ndarray) -> np.ndarray:
    """(n, k) sign bytes -> (n, 8 k) int8 +1 / -1, bit j of byte i for element 8 i + j."""
    return np.int8(1) - np.int8(2) * np.unpackbits(s, axis=-1, bitorder="little").view(np.int8)


def _ksigns(u32: np.ndarray) -> np.ndarray:
    """(n, k) uint32 -> (n, 32 k) +1 / -1: four 7-bit sign indices (bits 0, 7, 14, 21) each."""
    idx = (u32[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & np.uint32(0x7F)
    return _sign_bits(_KSIGNS[idx].reshape(u32.shape[0], -1))


def _points(name: str, idx: np.ndarray) -> np.ndarray:
    """(n, k) grid indices -> (n, k * width) int8 grid values."""
    from .quant_grids import grid

    return grid(name)[idx].reshape(idx.shape[0], -1)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2 k) float32: low then high nibble of each byte in turn."""
    return np.stack([b & np.uint8(0x0F), b >> np.uint8(4)], axis=-1).reshape(b.shape[0], -1).astype(np.float32)


def iq_codes(t: GGMLType, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An IQ1/IQ2/IQ3 type's (n, type_size) blocks -> (codes, scale): codes int8 (n, 256), scale
    float32 (n, 256 // IQ_GROUP[t]), weight = scale * code, with gguf-py's rounding (exactly: each
    gguf-py weight is one product of a scale and a small integer, or of dl and grid + delta,
    which is dl / 8 times the integer 8 (grid + delta), a power-of-two step). Codes are grid
    values with their signs (IQ2: 8, 25, 43; IQ3_XXS: 4..62; IQ3_S: 1..15) or, for IQ1, 8 times
    grid + delta (grid -1, 0, 1; delta +-1/8): -9..9."""
    n = b.shape[0]
    d = _f16(b[:, :2]) if t != GGMLType.IQ1_M else None
    if t == GGMLType.IQ2_XXS:
        aux = b[:, 2:].view(np.uint32).reshape(n, 8, 2)  # per 32: 4 grid indices, signs and scale
        codes = _points("IQ2_XXS", b[:, 2:].reshape(n, 8, 8)[:, :, :4].reshape(n, 32)) * _ksigns(aux[..., 1])
        return codes, d * (np.float32(0.5) + (aux[..., 1] >> 28).astype(np.float32)) * np.float32(0.25)
    if t in (GGMLType.IQ2_XS, GGMLType.IQ2_S):
        db = d * (np.float32(0.5) + _nibbles(b[:, -8:])) * np.float32(0.25)
        if t == GGMLType.IQ2_XS:  # 32 uint16: 9-bit grid index, 7-bit sign index
            qs = b[:, 2:66].view(np.uint16)
            signs = _sign_bits(_KSIGNS[qs >> np.uint16(9)])
            return _points("IQ2_XS", qs & np.uint16(511)) * signs, db
        qh = (b[:, 66:74, None] >> np.array([0, 2, 4, 6], np.uint8)) & np.uint8(3)  # 2 high bits each
        idx = b[:, 2:34].astype(np.uint16) | (qh.reshape(n, 32).astype(np.uint16) << np.uint16(8))
        return _points("IQ2_S", idx) * _sign_bits(b[:, 34:66]), db
    if t == GGMLType.IQ3_XXS:
        aux = b[:, 66:98].view(np.uint32)  # per 32: 4 sign indices and a 4-bit scale
        codes = _points("IQ3_XXS", b[:, 2:66]) * _ksigns(aux)
        return codes, d * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.5)
    if t == GGMLType.IQ3_S:
        qh = np.unpackbits(b[:, 66:74], axis=-1, bitorder="little").astype(np.uint16)
        idx = b[:, 2:66].astype(np.uint16) | (qh << np.uint16(8))
        sc = (b[:, 106:110, None] >> np.array([0, 4], np.uint8)) & np.uint8(0x0F)
        return _points("IQ3_S", idx) * _sign_bits(b[:, 74:106]), d * (1 + 2 * sc.reshape(n, 8))
    if t == GGMLType.IQ1_S:
        qh = b[:, 34:50].view(np.uint16)  # per 32: 4 x 3 high index bits, 3-bit scale, delta sign
        idx = b[:, 2:34].astype(np.uint16) | (((qh[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7))
                                              .reshape(n, 32) << np.uint16(8))
        delta = np.where(qh & np.uint16(0x8000), np.int8(-1), np.int8(1)).repeat(32, axis=-1)
        dl = d * (2 * ((qh >> np.uint16(12)) & np.uint16(7)) + 1)
        return np.int8(8) * _points("IQ1_S", idx) + delta, dl * np.float32(0.125)
    if t == GGMLType.IQ1_M:
        qs, qh, sc = b[:, :32], b[:, 32:48], b[:, 48:56].view(np.uint16)
        d = (((sc & np.uint16(0xF000)) >> np.array([12, 8, 4, 0], np.uint16)).sum(-1, dtype=np.uint16)
             .view(np.float16).astype(np.float32)[:, None])  # the top nibbles of the 4 scale words
        hi = (qh[..., None] >> np.array([0, 4], np.uint8)).reshape(n, 32)  # per 8: 3 index bits, delta
        idx = qs.astype(np.uint16) | ((hi & np.uint8(7)).astype(np.uint16) << np.uint16(8))
        delta = np.where(hi & np.uint8(8), np.int8(-1), np.int8(1)).repeat(8, axis=-1)
        dl = d * (2 * ((sc[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7)).reshape(n, 16) + 1)
        return np.int8(8) * _points("IQ1_S", idx) + delta, dl * np.float32(0.125)
    raise ValueError(t)


def _iq(t: GGMLType):
    def dequantize(b):
        codes, scale = iq_codes(t, b)
        n, g = scale.shape
        return (scale.reshape(n, g, 1) * codes.reshape(n, g, -1).astype(np.float32)).reshape(n, QK_K)
    return dequantize


_DEQUANTIZE = {
    GGMLType.F32: lambda b: b.view(np.float32),
    GGMLType.F16: lambda b: b.view(np.float16).astype(np.float32),
    GGMLType.BF16: lambda b: (b.view(np.int16).astype(np.int32) << 16).view(np.float32),
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.TQ1_0: _tq1_0,
    GGMLType.TQ2_0: _tq2_0,
    GGMLType.MXFP4: _mxfp4,
    **{t: _iq(t) for t in IQ_GROUP},
}


def dequantize_blocks(type_id: int, blocks: np.ndarray) -> np.ndarray:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32, bit-equal to gguf-py."""
    t = supported_type(type_id)
    block_size, type_size = BLOCK_LAYOUT[t]
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)  # .view() needs contiguous rows
    if blocks.ndim != 2 or blocks.shape[1] != type_size:
        raise ValueError(f"{t.name} blocks must have shape (n_blocks, {type_size}), got {blocks.shape}")
    if len(blocks) == 0:  # reshape(n, -1) cannot infer a size from zero blocks
        return np.zeros((0, block_size), np.float32)
    return _DEQUANTIZE[t](blocks).reshape(-1, block_size)


def count_nonfinite_scales(tensor: "QTensor") -> int:
    """How many blocks of a quantized tensor have a NaN or infinite float16 scale (0 for float
    types). Such a block makes every product it enters NaN; reading only the scales' exponent
    bits costs a fraction of the repack that follows."""
    offsets = _F16_SCALE_OFFSETS.get(tensor.ggml_type, ())
    if not offsets:
        return 0
    blocks = tensor.data.reshape(-1, BLOCK_LAYOUT[tensor.ggml_type][1])
    bad = np.zeros(len(blocks), bool)
    for offset in offsets:
        bits = blocks[:, offset:offset + 2].view(np.uint16)[:, 0]  # little-endian, as stored
        bad |= (bits & _F16_EXPONENT) == _F16_EXPONENT
    return int(np.count_nonzero(bad))


# -- QTensor ------------------------------------------------------------------------------------

_CHUNK_BYTES = 1 << 24  # dequantize big tensors in pieces to bound the temporaries


class QTensor:
    """A tensor as stored in a model file: its ggml type, its NumPy shape and its raw bytes.

    `shape` is NumPy order: (rows, cols) for a 2-D weight (GGUF lists dims the other way round).
    `data` is always uint8, whatever the type (F32/F16/BF16 included): for 2-D and higher
    (*shape[:-1], row_bytes), for 1-D (n_bytes,). Usually a read-only view of a memory map, never
    a copy. A row is a whole number of blocks, so rows and block-aligned column ranges are views.
    """

    __slots__ = ("ggml_type", "shape", "data")

    def __init__(self, ggml_type: int, shape, data: np.ndarray):
        self.ggml_type = supported_type(ggml_type)
        self.shape = tuple(int(d) for d in shape)
        block_size, type_size = BLOCK_LAYOUT[self.ggml_type]
        cols = self.shape[-1] if self.shape else 1
        if data.dtype != np.uint8 or cols % block_size or data.size != self.n_elements // block_size * type_size:
            raise ValueError(f"QTensor: {data.dtype} data of {data.size} bytes does not hold a "
                             f"{self.ggml_type.name} tensor of shape {self.shape}")
        row_bytes = cols // block_size * type_size
        self.data = data.reshape(self.shape[:-1] + (row_bytes,) if len(self.shape) >= 2 else (-1,))

    @classmethod
    def from_float(cls, array: np.ndarray) -> "QTensor":
        """Wrap a float32/float16 array without copying (other dtypes are converted to float32)."""
        array = np.asarray(array)
        if array.dtype not in (np.float32, np.float16):
            array = array.astype(np.float32)
        array = np.ascontiguousarray(array)
        t = GGMLType.F32 if array.dtype == np.float32 else GGMLType.F16
        rows = array.reshape(array.shape[:-1] + (-1,) if array.ndim else (1,))
        return cls(t, array.shape, rows.view(np.uint8))

    @property
    def nbytes(self) -> int:
        return self.data.size

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 of `shape`. For F32 this is a (read-only, if mapped) view, not a copy."""
        block_size, type_size = BLOCK_LAYOUT[self.ggml_type]
        blocks = self.data.reshape(-1, type_size)  # copies only a strided col_slice
        step = max(1, _CHUNK_BYTES // (block_size * 4))
        if self.ggml_type == GGMLType.F32 or len(blocks) <= step:
            return dequantize_blocks(self.ggml_type, blocks).reshape(self.shape)
        out = np.empty((len(blocks), block_size), np.float32)
        for i in range(0, len(blocks), step):
            out[i:i + step] = dequantize_blocks(self.ggml_type, blocks[i:i + step])
        return out.reshape(self.shape)

    def row_slice(self, start: int, stop: int) -> "QTensor":
        """Rows start..stop (along the first axis) as a view."""
        if len(self.shape) < 2 or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"row_slice({start}, {stop}) is out of range for shape {self.shape}")
        return QTensor(self.ggml_type, (stop - start,) + self.shape[1:], self.data[start:stop])

    def col_slice(self, start: int, stop: int) -> "QTensor":
        """Columns start..stop (along the last axis) as a strided view; block-aligned only."""
        block_size, type_size = BLOCK_LAYOUT[self.ggml_type]
        cols = self.shape[-1] if self.shape else 1
        if not 0 <= start <= stop <= cols or start % block_size or stop % block_size:
            raise ValueError(f"col_slice({start}, {stop}) must lie in 0..{cols} on {self.ggml_type.name} "
                             f"block boundaries (multiples of {block_size})")
        b0, b1 = start // block_size * type_size, stop // block_size * type_size
        return QTensor(self.ggml_type, self.shape[:-1] + (stop - start,), self.data[..., b0:b1])

    def __repr__(self) -> str:
        return f"QTensor({self.ggml_type.name}, shape={self.shape})"
