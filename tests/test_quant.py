"""Dequantization against the oracle, gguf-py's `gguf.quants.dequantize`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
from torchless.errors import UnsupportedModelError
from torchless.quant import BLOCK_LAYOUT, GGMLType, QTensor, dequantize_blocks

# Byte offsets of each type's float16 scale fields: filled with finite values so that the
# comparison exercises the arithmetic rather than NaN propagation.
F16_FIELDS = {GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
              GGMLType.Q8_0: [0], GGMLType.IQ4_NL: [0],
              GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108],
              GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208], GGMLType.IQ4_XS: [0],
              GGMLType.TQ1_0: [52], GGMLType.TQ2_0: [64], GGMLType.IQ2_XXS: [0], GGMLType.IQ2_XS: [0],
              GGMLType.IQ2_S: [0], GGMLType.IQ3_XXS: [0], GGMLType.IQ3_S: [0], GGMLType.IQ1_S: [0]}
# the types added to the fast kinds after the first release; each is held to gguf-py below
NEW_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.TQ1_0, GGMLType.TQ2_0,
             GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ1_S]
TYPES = list(BLOCK_LAYOUT)


def random_blocks(t: GGMLType, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, type_size = BLOCK_LAYOUT[t]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(t, []):
        scale = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if t == GGMLType.IQ1_M:  # d is the top nibbles of 4 uint16 scale words: keep it finite
        d = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype(np.float16)
        nib = (d.view(np.uint16)[:, None] >> np.array([0, 4, 8, 12], np.uint16)) & np.uint16(0xF)
        words = blocks[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF) | (nib << np.uint16(12))
        blocks[:, 48:56] = words.view(np.uint8)
    if t == GGMLType.MXFP4:  # the e8m0 scale 2^(e - 127): moderate, and the subnormal e = 0, 1
        blocks[:, 0] = rng.choice(np.r_[0, 1, 100:135], n_blocks).astype(np.uint8)
    if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):  # whole elements: keep them finite too
        dtype = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.float32}[t]
        vals = rng.standard_normal(n_blocks).astype(dtype).view(np.uint8).reshape(n_blocks, -1)
        blocks = vals[:, -type_size:].copy()  # BF16: the high half of a float32
    return blocks


def oracle(t: GGMLType, data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(t)))


def assert_bits_equal(a: np.ndarray, b: np.ndarray):
    """Exact equality, distinguishing -0.0 from 0.0 and comparing NaN payloads too."""
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bad = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
    assert bad.size == 0, f"{bad.size} elements differ, first at {bad[0]}: {a.flat[bad[0]]} vs {b.flat[bad[0]]}"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_blocks_matches_gguf_py(t, seed):
    blocks = random_blocks(t, 517, seed)
    block_size, _ = BLOCK_LAYOUT[t]
    assert_bits_equal(dequantize_blocks(t, blocks), oracle(t, blocks).reshape(-1, block_size))


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1,
                               GGMLType.Q8_0, *NEW_TYPES, GGMLType.MXFP4, GGMLType.IQ1_M], ids=lambda t: t.name)
def test_dequantize_blocks_any_bytes(t):
    """Completely random bytes (NaN and inf scales included) still match bit for bit."""
    _, type_size = BLOCK_LAYOUT[t]
    blocks = np.random.default_rng(7).integers(0, 256, (300, type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 is NaN, on both sides
        assert_bits_equal(dequantize_blocks(t, blocks), oracle(t, blocks).reshape(300, -1))


def test_iq_grids_match_gguf_py():
    """The lattice tables stored in torchless (quant_grids) are gguf-py's, value for value."""
    from torchless.quant_grids import grid

    for name in ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]:
        cls = getattr(gguf.quants, name)
        cls.init_grid()
        assert np.array_equal(grid(name).astype(np.float32), cls.grid.reshape(cls.grid_shape)), name


def test_block_layout_matches_gguf_py():
    for t, layout in BLOCK_LAYOUT.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))] == layout
        assert gguf.GGMLQuantizationType(int(t)).name == t.name


@pytest.mark.parametrize("type_id, name", [(GGMLType.Q8_K, "Q8_K"), (GGMLType.Q8_1, "Q8_1"), (99, "99")])
def test_unsupported_types_are_named(type_id, name):
    with pytest.raises(UnsupportedModelError, match=name):
        dequantize_blocks(type_id, np.zeros((1, 18), np.uint8))
    with pytest.raises(UnsupportedModelError, match=f"{name}.*supported: F32, F16"):
        QTensor(type_id, (32,), np.zeros(18, np.uint8))


def random_qtensor(t: GGMLType, rows: int, blocks_per_row: int, seed: int = 0) -> QTensor:
    block_size, _ = BLOCK_LAYOUT[t]
    data = random_blocks(t, rows * blocks_per_row, seed).reshape(rows, -1)
    return QTensor(t, (rows, blocks_per_row * block_size), data)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_qtensor_dequantize_and_slices(t):
    q = random_qtensor(t, rows=7, blocks_per_row=4)
    block_size, type_size = BLOCK_LAYOUT[t]
    full = q.dequantize()
    assert full.shape == q.shape == (7, 4 * block_size)
    assert q.n_elements == 7 * 4 * block_size and q.nbytes == 7 * 4 * type_size
    assert_bits_equal(full, oracle(t, q.data).reshape(q.shape))

    rows = q.row_slice(2, 5)
    assert rows.shape == (3, q.shape[1]) and np.shares_memory(rows.data, q.data)
    assert_bits_equal(rows.dequantize(), full[2:5])

    cols = q.col_slice(block_size, 3 * block_size)
    assert cols.shape == (7, 2 * block_size) and np.shares_memory(cols.data, q.data)
    assert_bits_equal(cols.dequantize(), full[:, block_size:3 * block_size])
    assert_bits_equal(cols.row_slice(6, 7).dequantize(), full[6:7, block_size:3 * block_size])
    assert q.row_slice(3, 3).dequantize().shape == (0, q.shape[1])


def test_qtensor_big_tensor_is_dequantized_in_chunks_exactly():
    q = random_qtensor(GGMLType.Q4_K, rows=300, blocks_per_row=300)  # > one 16 MiB chunk of output
    assert_bits_equal(q.dequantize(), oracle(GGMLType.Q4_K, q.data).reshape(q.shape))


def test_qtensor_slice_errors():
    q = random_qtensor(GGMLType.Q8_0, rows=4, blocks_per_row=3)
    for start, stop in [(1, 32), (0, 33), (32, 31), (0, 128), (-32, 32)]:
        with pytest.raises(ValueError):
            q.col_slice(start, stop)
    for start, stop in [(-1, 2), (2, 1), (0, 5)]:
        with pytest.raises(ValueError):
            q.row_slice(start, stop)
    with pytest.raises(ValueError):
        QTensor(GGMLType.Q8_0, (4, 96), q.data[:3])  # byte count does not fit the shape
    with pytest.raises(ValueError):
        QTensor(GGMLType.Q8_0, (4, 48), np.zeros((4, 51), np.uint8))  # row not whole blocks


@pytest.mark.parametrize("dtype, t", [(np.float32, GGMLType.F32), (np.float16, GGMLType.F16)])
def test_from_float_wraps_without_copy(dtype, t):
    a = np.random.default_rng(0).standard_normal((5, 6)).astype(dtype)
    q = QTensor.from_float(a)
    assert q.ggml_type == t and q.shape == (5, 6) and q.data.dtype == np.uint8
    assert q.data.shape == (5, 6 * a.itemsize) and np.shares_memory(q.data, a)
    assert np.array_equal(q.dequantize(), a.astype(np.float32))
    assert np.array_equal(q.col_slice(2, 5).dequantize(), a[:, 2:5].astype(np.float32))
    v = QTensor.from_float(a[1])
    assert v.shape == (6,) and v.data.shape == (6 * a.itemsize,)
    assert np.array_equal(v.dequantize(), a[1].astype(np.float32))


def test_smollm2_every_tensor_matches_gguf_py(smollm2_path):
    from torchless.formats.gguf import GGUFFile

    reader = gguf.GGUFReader(smollm2_path)
    with GGUFFile(smollm2_path) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for rt in reader.tensors:
            q = f.tensors[rt.name]
            assert q.ggml_type == int(rt.tensor_type), rt.name
            assert q.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name
            assert np.array_equal(q.data.reshape(-1), rt.data.view(np.uint8).reshape(-1)), rt.name
            assert_bits_equal(q.dequantize(), oracle(q.ggml_type, rt.data).reshape(q.shape))


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
                               *NEW_TYPES], ids=lambda t: t.name)
def test_count_nonfinite_scales(t):
    """Every float16 scale field of a block (d, and m where the type has one) is checked."""
    from torchless.quant import count_nonfinite_scales

    q = random_qtensor(t, rows=4, blocks_per_row=3)
    assert count_nonfinite_scales(q) == 0
    data = q.data.copy().reshape(-1, BLOCK_LAYOUT[t][1])
    for block, (off, value) in zip([1, 5], [(F16_FIELDS[t][-1], np.inf), (F16_FIELDS[t][0], np.nan)]):
        data[block, off:off + 2] = np.array([value], np.float16).view(np.uint8)
    assert count_nonfinite_scales(QTensor(t, q.shape, data.reshape(q.data.shape))) == 2


# the layout each new type is repacked into at load: (kind, group of columns per scale, has a
# min, code range ("q8", byte codes) or bytes per 32 columns ("q4": 2-, 3-bit and IQ4 codes))
REPACK = {GGMLType.Q2_K: ("q4", 16, True, 8), GGMLType.Q3_K: ("q4", 16, False, 12),
          GGMLType.IQ4_NL: ("q4", 32, False, 17), GGMLType.IQ4_XS: ("q4", 32, False, 17),
          **{t: ("q8",) + v for t, v in {
             GGMLType.TQ1_0: (32, False, (-1, 1)), GGMLType.TQ2_0: (32, False, (-1, 2)),  # 3 (unused) decodes to 2
             GGMLType.MXFP4: (32, False, (-12, 12)),
             GGMLType.IQ2_XXS: (32, False, (-43, 43)), GGMLType.IQ2_XS: (16, False, (-43, 43)),
             GGMLType.IQ2_S: (16, False, (-43, 43)), GGMLType.IQ3_XXS: (32, False, (-62, 62)),
             GGMLType.IQ3_S: (32, False, (-15, 15)), GGMLType.IQ1_S: (32, False, (-9, 9)),
             GGMLType.IQ1_M: (16, False, (-9, 9))}.items()}}


@pytest.mark.parametrize("t", list(REPACK), ids=lambda t: t.name)
def test_new_types_repacked_exactly(t):
    """Each new type becomes its kernel layout, and scale * code + min is gguf-py's weight
    exactly for random blocks (finite scales) -- through the row dequantizer (embedding lookups)
    and the BLAS prefill's transposed expansion of the tiles. The products (decode matvec, the
    batched kernels) on that kind are then held to the float64 product of gguf-py's weights
    (the direct kernels at 3 rows where the layout has them, the expanded tiles at 5)."""
    from torchless.kernels import gemm
    from torchless.kernels import qmatmul as qm

    rows, cols = 70, 512
    block_size, _ = BLOCK_LAYOUT[t]
    q = random_qtensor(t, rows=rows, blocks_per_row=cols // block_size, seed=11)
    ref = oracle(t, q.data).reshape(rows, cols)
    w = qm.prepare(q)
    kind, group, has_min, codes = REPACK[t]
    assert (w.kind, w.group, w.codes.dtype) == (kind, group, np.int8 if kind == "q8" else np.uint8)
    assert (w.min.size > 0) == has_min
    if kind == "q8":
        assert w.codes.min() == codes[0] and w.codes.max() == codes[1]  # 70 x 512 random codes reach both ends
    else:
        assert w.codes.shape[2] == codes
    np.testing.assert_array_equal(qm.dequantize_rows(w, 0, rows), ref)
    out = np.empty((cols, rows - 3), np.float32)
    np.testing.assert_array_equal(gemm.dequantize_transposed_into(w, out, 3, rows), ref[3:].T)

    from torchless.kernels import adaptive

    # 3 rows: the direct kernels where the layout has them; 5: the expanded float tiles
    for n_rows in (3, 5):
        X = np.random.default_rng(1).standard_normal((n_rows, cols)).astype(np.float32)
        X[:, 5] *= 40  # an outlier column, as real activations have
        exact = X.astype(np.float64) @ ref.T.astype(np.float64)  # (n_rows, rows)
        float_bound = 1e-4 * (np.abs(X) @ np.abs(ref.T)) + 1e-30  # float32 accumulation
        y = np.full(rows, np.nan, np.float32)
        qm.matvec_into(w, X[0], y)
        np.testing.assert_array_less(np.abs(y - exact[0]), float_bound[0])
        for fn in (qm.matmul_into, adaptive.matmul_adaptive_into):
            Y = np.full((n_rows, rows), np.nan, np.float32)
            fn(w, X, Y)
            np.testing.assert_array_less(np.abs(Y - exact), float_bound)
