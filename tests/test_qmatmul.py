"""qmatmul against gguf-py: products on every supported type equal the float64 product of the
weights as gguf-py dequantizes them, for whole matrices, row ranges, threads and matmul."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from torchless.kernels import qmatmul as qm
from torchless.quant import QTensor

QK_K = 256
# types gguf-py can quantize: real quantized data; the k-quants: random valid blocks
QUANTIZABLE = [GT.F32, GT.F16, GT.BF16, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0]
K_TYPES = [GT.Q4_K, GT.Q5_K, GT.Q6_K]
ALL = QUANTIZABLE + K_TYPES


def make_weight(qtype, rows, cols, seed=0):
    """-> (QTensor, float64 dequantized oracle)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gq.quantize(w, qtype)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    else:
        block_bytes = {GT.Q4_K: 144, GT.Q5_K: 176, GT.Q6_K: 210}[qtype]
        blocks = rng.integers(0, 256, (rows, cols // QK_K, block_bytes), dtype=np.uint8)
        # the f16 super-block scales: random bytes could be inf/NaN, so draw sane ones
        scales = rng.uniform(1e-3, 2e-2, (rows, cols // QK_K, 2)).astype(np.float16).view(np.uint8)
        if qtype == GT.Q6_K:
            blocks[..., 208:210] = scales[..., 0:2].reshape(rows, cols // QK_K, 2)
        else:
            blocks[..., 0:4] = scales.reshape(rows, cols // QK_K, 4)
        raw = blocks.reshape(rows, -1)
    ref = gq.dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)
    return QTensor(int(qtype), (rows, cols), raw), ref


def check(out, ref_w, x, rows=slice(None)):
    """float32 accumulation against float64: the error of a float32 dot of length n is at most
    about n * eps32 * sum|w_i x_i| (n <= 1536 here -> <= 1e-4 relative to sum|w x|); real errors
    are far smaller, so 1e-4 of |W| @ |x| is a tolerance that would still catch any wrong weight."""
    ref = ref_w[rows] @ x.astype(np.float64)
    bound = np.abs(ref_w[rows]) @ np.abs(x.astype(np.float64))
    np.testing.assert_array_less(np.abs(out[rows] - ref), 1e-4 * bound + 1e-30)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 45, 64])
def test_matvec_all_types(qtype, rows):
    cols = 512
    qt, ref = make_weight(qtype, rows, cols, seed=rows)
    w = qm.prepare(qt)
    assert w.shape == (rows, cols) and w.ggml_type == int(qtype) and w.nbytes > 0
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    qm.matvec_into(w, x, out)
    check(out, ref, x)
    out2 = np.full(rows, np.nan, np.float32)
    qm.matvec_rows(w, x, out2, 0, rows)
    np.testing.assert_array_equal(out, out2)  # same arithmetic, thread count does not matter


@pytest.mark.parametrize("qtype", [GT.Q4_1, GT.Q5_1, GT.Q8_0, GT.Q6_K, GT.F16], ids=lambda t: t.name)
def test_row_ranges_write_only_their_rows(qtype):
    rows, cols = 101, 256
    qt, ref = make_weight(qtype, rows, cols, seed=3)
    w = qm.prepare(qt)
    x = np.random.default_rng(2).standard_normal(cols).astype(np.float32)
    for start, stop in [(0, 101), (0, 32), (5, 6), (31, 33), (40, 101), (64, 96), (100, 101), (7, 7)]:
        for fn in (qm.matvec_rows, qm.matvec_into):
            out = np.full(rows, np.nan, np.float32)
            fn(w, x, out, start, stop)
            assert np.isnan(out[:start]).all() and np.isnan(out[stop:]).all()
            check(out, ref, x, slice(start, stop))


def test_threads_on_disjoint_ranges():
    """matvec_rows releases the GIL and shares no scratch: concurrent chunks give the serial result."""
    rows, cols = 1000, 576
    qt, ref = make_weight(GT.Q4_1, rows, cols, seed=4)
    w = qm.prepare(qt)
    x = np.random.default_rng(3).standard_normal(cols).astype(np.float32)
    serial = np.empty(rows, np.float32)
    qm.matvec_rows(w, x, serial, 0, rows)
    out = np.full(rows, np.nan, np.float32)
    bounds = list(range(0, rows, 96)) + [rows]
    ths = [threading.Thread(target=qm.matvec_rows, args=(w, x, out, a, b)) for a, b in zip(bounds, bounds[1:])]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    np.testing.assert_array_equal(out, serial)
    check(out, ref, x)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_matmul_every_batch_size(qtype):
    """Batched products for M = 1..64 (odd M, rows not a multiple of 32) equal the float64
    product of gguf-py's weights within `check`'s float32 bound, by prange and by the
    task-scheduled kernels."""
    from torchless.kernels import adaptive

    rows, cols = 77, 256
    qt, ref = make_weight(qtype, rows, cols, seed=5)
    w = qm.prepare(qt)
    for m in list(range(1, 18)) + [31, 32, 33, 63, 64]:
        X = np.random.default_rng(m).standard_normal((m, cols)).astype(np.float32)
        X[:, 5] *= 40  # an outlier column, as real activations have
        for fn in (qm.matmul_into, adaptive.matmul_adaptive_into):
            out = np.full((m, rows), np.nan, np.float32)
            fn(w, X, out)
            for i in range(m):
                check(out[i], ref, X[i])


@pytest.mark.parametrize("qtype", [GT.Q4_1, GT.Q8_0, GT.Q4_K, GT.Q5_0, GT.Q5_K, GT.Q6_K, GT.F32],
                         ids=lambda t: t.name)
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(qtype):
    """A row of X gets the same bits whether multiplied alone in its kernel's range of batch
    sizes or with up to 20 others: the direct kernel's blocks of 4, 3, 2 and 1 rows (1 to 4 rows
    on 4-, 5-, 6-bit and byte codes), the expanded float kernel's 8, 4, 2 and 1 (from 5 rows,
    and at every size on f32). What keeps a micro-batch's logits the same however the engine
    cuts it within a range."""
    from torchless.kernels.direct_tiles import DIRECT_MAX_ROWS

    switch = None if qtype == GT.F32 else DIRECT_MAX_ROWS
    ranges = [(2, 22)] if switch is None else [(1, switch), (switch, 22)]
    rows, cols = 70, 256
    w = qm.prepare(make_weight(qtype, rows, cols, seed=3)[0])
    X = np.random.default_rng(4).standard_normal((21, cols)).astype(np.float32)
    for lo, hi in ranges:
        n = hi - 1
        whole = np.empty((n, rows), np.float32)
        qm.matmul_into(w, X[:n], whole)
        for m in range(lo, n):
            part = np.empty((m, rows), np.float32)
            qm.matmul_into(w, X[n - m:n], part)
            np.testing.assert_array_equal(part, whole[n - m:], err_msg=f"{m} of {n} rows")


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q4_1, GT.Q8_0, GT.Q4_K, GT.Q5_0, GT.Q5_1, GT.Q5_K],
                         ids=lambda t: t.name)
def test_a_rows_matvec_equals_its_batched_product(qtype):
    """On 4-, 5- and 8-bit codes a row's matvec (a sequence decoding alone: serial, prange and
    task-scheduled) gets the bits that row gets in a batched product of 1 to 4 rows (the same
    sequence in a micro-batch): the matvec sums a group's codes with the direct kernel's code."""
    from torchless.kernels import adaptive

    rows, cols = 70, 256
    w = qm.prepare(make_weight(qtype, rows, cols, seed=8)[0])
    X = np.random.default_rng(9).standard_normal((4, cols)).astype(np.float32)
    X[:, 7] *= 30  # an outlier column
    batched = np.empty((4, rows), np.float32)
    qm.matmul_into(w, X, batched)
    plan = adaptive._matmul_plan(rows, cols, None, 2)  # tasks of 32 rows and less

    def tasks(x, out):
        adaptive._TASK_KERNELS[w.kind](w.codes, w.scale, w.min, w.group, x, out, plan.bounds, plan.owners,
                                       plan.starts)

    for i in range(4):
        for fn in (lambda x, out: qm.matvec_rows(w, x, out, 0, rows), lambda x, out: qm.matvec_into(w, x, out),
                   tasks):
            out = np.full(rows, np.nan, np.float32)
            fn(X[i], out)
            np.testing.assert_array_equal(out, batched[i], err_msg=f"row {i}")


def test_dequantize_rows_exact():
    for qtype in ALL:
        qt, ref = make_weight(qtype, 40, 256, seed=6)
        w = qm.prepare(qt)
        np.testing.assert_array_equal(qm.dequantize_rows(w, 0, 40), ref.astype(np.float32))
        np.testing.assert_array_equal(qm.dequantize_rows(w, 33, 35), ref[33:35].astype(np.float32))


def test_bad_arguments():
    qt, _ = make_weight(GT.Q4_0, 8, 64)
    w = qm.prepare(qt)
    x, out = np.zeros(64, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError):
        qm.matvec_into(w, x, out, 3, 9)
    with pytest.raises(ValueError):
        qm.matvec_into(w, x.astype(np.float64), out)
    with pytest.raises(ValueError):
        qm.matvec_into(w, x, np.zeros(9, np.float32))
    with pytest.raises(ValueError):
        qm.matmul_into(w, np.zeros((2, 64), np.float32), np.zeros((2, 7), np.float32))


@pytest.mark.parametrize("qtype", [GT.Q5_0, GT.Q5_1], ids=lambda t: t.name)
def test_q5_repacked_as_five_bit_q4_exactly(qtype):
    """Q5_0/Q5_1 become the "q4" kind with fifth bits (20 bytes per 32 codes and row): codes q,
    scale d, min -16 d (Q5_0) or m (Q5_1), and scale * code + min is gguf-py's weight exactly,
    for random bytes (finite scales) too; the BLAS prefill's transposed expansion of the same
    tiles is exact as well."""
    from torchless.kernels import gemm

    rows, cols = 70, 192
    rng = np.random.default_rng(11)
    head = 2 if qtype == GT.Q5_0 else 4
    blocks = rng.integers(0, 256, (rows, cols // 32, head + 20), dtype=np.uint8)
    scales = (rng.standard_normal((rows, cols // 32, head // 2)) * 10.0 ** rng.integers(-6, 3, (rows, cols // 32, 1)))
    blocks[..., :head] = scales.astype(np.float16).view(np.uint8).reshape(rows, cols // 32, head)
    raw = blocks.reshape(rows, -1)
    ref = gq.dequantize(raw, qtype).reshape(rows, cols)
    w = qm.prepare(QTensor(int(qtype), (rows, cols), raw))
    assert (w.kind, w.group, w.codes.dtype, w.codes.shape[2]) == ("q4", 32, np.uint8, 20)
    assert w.min.shape[1] == cols // 32
    np.testing.assert_array_equal(qm.dequantize_rows(w, 0, rows), ref)
    out = np.empty((cols, rows - 3), np.float32)
    np.testing.assert_array_equal(gemm.dequantize_transposed_into(w, out, 3, rows), ref[3:].T)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_blas_product_in_row_blocks_equals_the_expanded_weight(n_threads):
    """matmul_blas_into expands and multiplies BLOCK_ROWS rows at a time, each thread its share:
    every output column comes from its own row of W, whatever the blocks and shares."""
    from torchless.kernels import gemm

    rows, cols = 2 * gemm.BLOCK_ROWS + 37, 96  # blocks and shares that do not divide the rows
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (rows, cols // 32 * 20), dtype=np.uint8)
    raw.reshape(rows, -1, 20)[:, :, :4] = np.frombuffer(np.float16([0.01, -0.02]).tobytes(), np.uint8)
    w = qm.prepare(QTensor(int(GT.Q4_1), (rows, cols), raw))
    X = rng.standard_normal((70, cols)).astype(np.float32)
    out = np.full((70, rows), np.nan, np.float32)
    gemm.matmul_blas_into(w, X, out, n_threads)
    expected = X.astype(np.float64) @ qm.dequantize_rows(w, 0, rows).T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_packed_nbytes_is_what_prepare_holds():
    """`inspect`'s packed column comes from packed_nbytes, without repacking: for every type the
    kernels run, it must equal what prepare really allocates (rows not a multiple of a tile)."""
    from torchless.quant import BLOCK_LAYOUT

    rng = np.random.default_rng(3)
    rows, cols = 37, 256
    tested = 0
    for t, (block, size) in BLOCK_LAYOUT.items():
        try:
            qm.packed_layout(t, cols)
        except ValueError:
            continue
        tested += 1
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        if t in (GT.F32, GT.F16, GT.BF16):
            raw = np.zeros_like(raw)  # finite values
        if t in (GT.Q4_0, GT.Q5_0):  # scales of a real file: -8 d (-16 d) must not overflow float16
            raw.reshape(rows, -1, size)[..., 1] &= 0x3F
        assert qm.prepare(QTensor(int(t), (rows, cols), raw)).nbytes == qm.packed_nbytes(t, (rows, cols)), t
    assert tested >= 20


@pytest.mark.parametrize("t", sorted(qm.F16_SCALE_TYPES))
def test_float16_scales_are_kept_as_float16_and_read_back_exactly(t):
    """The types whose file scales are float16 keep them as float16 bits (half the bytes a decode
    step reads for them) and every kernel widens them exactly: dequantization equals gguf-py bit
    for bit, subnormal, inf and NaN scales included, and matvec and the batched kernels equal the
    float32-scale products. A Q4_0 (Q5_0) whose min -8 d (-16 d) overflows float16 falls back to
    float32 scales, still exact. (An infinite Q4_0/Q5_0 scale is not exact: its weights come out
    as NaN where gguf-py has -inf or +inf, as d q + min adds inf and -inf.)"""
    from torchless.quant import BLOCK_LAYOUT

    block, size = BLOCK_LAYOUT[GT(t)]
    rng = np.random.default_rng(t)
    rows, cols = 70, 256
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    if t in (GT.Q4_0, GT.Q5_0):
        raw.reshape(rows, -1, size)[..., 1] &= 0x3F
    w = qm.prepare(QTensor(int(t), (rows, cols), raw))
    assert w.scale.dtype == np.uint16 and w.min.dtype == np.uint16
    wide = qm.PackedWeight(w.ggml_type, w.shape, w.kind, w.group, w.codes,
                           w.scale.view(np.float16).astype(np.float32), w.min.view(np.float16).astype(np.float32))
    assert w.nbytes < wide.nbytes
    ref = gq.dequantize(raw, GT(t)).reshape(rows, cols).astype(np.float32)
    np.testing.assert_array_equal(qm.dequantize_rows(w, 0, rows), ref)
    finite = np.isfinite(ref).all(axis=1)
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((5, cols)).astype(np.float32)
    Y, Yw = np.empty((5, rows), np.float32), np.empty((5, rows), np.float32)
    qm.matmul_into(w, X, Y)
    qm.matmul_into(wide, X, Yw)
    # the same products to float32 rounding (LLVM may fuse a different multiply-add of the two
    # loops into an FMA); a scale widened wrongly moves a row by its whole size
    bound = np.abs(ref[finite]) @ np.abs(x.astype(np.float64))
    np.testing.assert_array_less(np.abs(qm.matvec(w, x)[finite] - qm.matvec(wide, x)[finite]), 1e-6 * bound)
    bound = np.abs(X.astype(np.float64)) @ np.abs(ref[finite]).T
    np.testing.assert_array_less(np.abs(Y[:, finite] - Yw[:, finite]), 1e-6 * bound)
    if t in (GT.Q4_0, GT.Q5_0):
        raw.reshape(rows, -1, size)[0, 0, :2] = np.frombuffer(np.float16([60000.0]).tobytes(), np.uint8)
        big = qm.prepare(QTensor(int(t), (rows, cols), raw))
        assert big.scale.dtype == np.float32
        ref = gq.dequantize(raw, GT(t)).reshape(rows, cols).astype(np.float32)
        np.testing.assert_array_equal(qm.dequantize_rows(big, 0, rows), ref)


def _one_level(w):
    """w with its two-level scales multiplied out into float32 (n_tiles, n_groups, TILE)."""
    def wide(a):
        if a.ndim != 4:
            return a
        n_tiles, n_super, per, tile = a.shape
        top = np.ascontiguousarray(a[:, :, :4, :]).reshape(n_tiles, n_super, 4 * tile).view(np.float32)
        sub = a[:, :, 4:, :]
        if a.dtype == np.uint8:  # sub-scales two to a byte: group 2 k low, 2 k + 1 high nibble
            sub = np.stack([sub & 15, sub >> 4], axis=3).reshape(n_tiles, n_super, -1, tile)
        with np.errstate(invalid="ignore", over="ignore"):
            return (top[:, :, None, :] * sub.astype(np.float32)).reshape(n_tiles, -1, tile)
    return qm.PackedWeight(w.ggml_type, w.shape, w.kind, w.group, w.codes, wide(w.scale), wide(w.min))


@pytest.mark.parametrize("t", sorted(qm.TWO_LEVEL_TYPES))
def test_two_level_scales_are_read_back_exactly(t):
    """The K types and IQ4_XS keep the file's super-block scale and integer sub-scales apart
    (a byte per group instead of a float32; Q2_K's 4-bit ones two to a byte): dequantization
    still equals gguf-py bit for bit,
    whatever the float16 super-block scales (random bytes: subnormal, inf and NaN included), and
    matvec and the batched kernels equal the products with the scales multiplied out."""
    from torchless.quant import BLOCK_LAYOUT

    block, size = BLOCK_LAYOUT[GT(t)]
    rng = np.random.default_rng(t)
    rows, cols = 70, 512
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    w = qm.prepare(QTensor(int(t), (rows, cols), raw))
    assert w.scale.dtype == (np.uint8 if t in qm.NIBBLE_SUBSCALE_TYPES else np.int8) and w.scale.ndim == 4
    wide = _one_level(w)
    assert w.nbytes < wide.nbytes
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gq.dequantize(raw, GT(t)).reshape(rows, cols).astype(np.float32)
    np.testing.assert_array_equal(qm.dequantize_rows(w, 0, rows), ref)
    np.testing.assert_array_equal(qm.dequantize_rows(w, 33, 35), ref[33:35])
    finite = np.isfinite(ref).all(axis=1)
    assert 10 < finite.sum() < rows  # both kinds of row are exercised
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((5, cols)).astype(np.float32)
    Y, Yw = np.empty((5, rows), np.float32), np.empty((5, rows), np.float32)
    qm.matmul_into(w, X, Y)
    qm.matmul_into(wide, X, Yw)
    np.testing.assert_array_equal(qm.matvec(w, x)[finite], qm.matvec(wide, x)[finite])
    np.testing.assert_array_equal(Y[:, finite], Yw[:, finite])


def test_packed_weights_stay_close_to_their_file_size():
    """Packed bytes per file byte for a real-sized matrix (2048 x 2048): the 2- to 8-bit types
    (most of a Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0 or IQ4_XS file) stay within 1.15x
    of the file, scales included."""
    from torchless.quant import BLOCK_LAYOUT

    shape = (2048, 2048)
    ratio = {}
    for t in (GT.Q2_K, GT.Q3_K, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0, GT.Q4_K, GT.Q5_K, GT.Q6_K,
              GT.IQ4_NL, GT.IQ4_XS):
        block, size = BLOCK_LAYOUT[t]
        ratio[t.name] = qm.packed_nbytes(t, shape) / (shape[0] * shape[1] // block * size)
    assert all(r <= 1.15 for r in ratio.values()), ratio


@pytest.mark.parametrize("avx2", [True, False])
def test_iq4_lookup_with_and_without_avx2(monkeypatch, avx2):
    """The IQ4 kernels look their nibbles up with vpshufb where the host has AVX2, else with a
    chain of selects: both give IQ4NL_VALUES[index] for every index (compiled here afresh, not
    from the kernel cache, with the host's AVX2 as the test says)."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from torchless.kernels import float_tiles
    from torchless.quant import IQ4NL_VALUES

    if avx2 and not float_tiles._HOST_AVX2:
        pytest.skip("this host has no AVX2")
    monkeypatch.setattr(float_tiles, "_HOST_AVX2", avx2)

    @intrinsic
    def look_up(typingctx, index, out):
        def codegen(context, builder, sig, args):
            v = ir.VectorType(ir.IntType(8), qm.TILE)
            src, dst = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1))
            index = builder.load(builder.bitcast(src.data, v.as_pointer()), align=1)
            builder.store(float_tiles._iq4_values(builder, index), builder.bitcast(dst.data, v.as_pointer()), align=1)
            return context.get_dummy_value()
        return types.void(index, out), codegen

    run = njit(lambda index, out: look_up(index, out))
    for start in (0, 16):
        index = (np.arange(qm.TILE) + start) % 16
        index = np.roll(index, 5).astype(np.uint8)
        out = np.zeros(qm.TILE, np.int8)
        run(index, out)
        np.testing.assert_array_equal(out, IQ4NL_VALUES[index])
