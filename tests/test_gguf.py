"""The GGUF reader against what gguf-py's GGUFWriter wrote and what its GGUFReader reads back,
and against broken files: every failure must be one ModelFileError (or UnsupportedModelError for
a quantization type we cannot run), never another exception."""

from __future__ import annotations

import hashlib
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf
from test_quant import assert_bits_equal, random_blocks
from torchless.errors import ModelFileError, TorchlessError, UnsupportedModelError
from torchless.formats.gguf import GGUFFile
from torchless.quant import BLOCK_LAYOUT, GGMLType, QTensor

VT = gguf.GGUFValueType

# key -> (value, type, array item type); general.architecture comes first, from the writer.
METADATA = {
    "t.u8": (200, VT.UINT8, None), "t.i8": (-100, VT.INT8, None),
    "t.u16": (60000, VT.UINT16, None), "t.i16": (-30000, VT.INT16, None),
    "t.u32": (4_000_000_000, VT.UINT32, None), "t.i32": (-2_000_000_000, VT.INT32, None),
    "t.u64": (2**63 + 5, VT.UINT64, None), "t.i64": (-(2**62), VT.INT64, None),
    "t.f32": (1.1, VT.FLOAT32, None), "t.f64": (0.1, VT.FLOAT64, None),
    "t.true": (True, VT.BOOL, None), "t.false": (False, VT.BOOL, None),
    "t.str": ("héllo ✓ <|im_end|>\n", VT.STRING, None),
    "t.arr_u16": ([1, 2, 65535], VT.ARRAY, VT.UINT16), "t.arr_i32": ([-1, 0, 7], VT.ARRAY, VT.INT32),
    "t.arr_i64": ([-(2**40), 3], VT.ARRAY, VT.INT64), "t.arr_f32": ([0.5, -2.25], VT.ARRAY, VT.FLOAT32),
    "t.arr_f64": ([0.1, 1e300], VT.ARRAY, VT.FLOAT64), "t.arr_bool": ([True, False, True], VT.ARRAY, VT.BOOL),
    "t.arr_str": (["a", "", "Ġ t", "✓✓"], VT.ARRAY, VT.STRING),
    "t.arr_arr": ([[1, 2], [3]], VT.ARRAY, None),
}
NP_TYPES = {VT.UINT16: np.uint16, VT.INT32: np.int32, VT.INT64: np.int64, VT.FLOAT32: np.float32,
            VT.FLOAT64: np.float64, VT.BOOL: np.bool_}


def sample_tensors() -> dict[str, tuple[GGMLType, tuple, np.ndarray]]:
    """name -> (type, NumPy shape, the bytes or array handed to the writer)."""
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    quant = lambda t, a: gguf.quants.quantize(a, gguf.GGMLQuantizationType(int(t)))  # noqa: E731
    raw = lambda t, rows, n_blocks, seed: random_blocks(t, rows * n_blocks, seed).reshape(rows, -1)  # noqa: E731
    return {
        "a.f32": (GGMLType.F32, (3, 5), f(3, 5)),
        "b.f16": (GGMLType.F16, (7,), f(7).astype(np.float16)),
        "c.bf16": (GGMLType.BF16, (2, 4), quant(GGMLType.BF16, f(2, 4))),
        "d.q8_0": (GGMLType.Q8_0, (4, 64), quant(GGMLType.Q8_0, f(4, 64))),
        "e.q4_0": (GGMLType.Q4_0, (2, 32), quant(GGMLType.Q4_0, f(2, 32))),
        "f.q4_1": (GGMLType.Q4_1, (3, 64), quant(GGMLType.Q4_1, f(3, 64))),
        "g.q4_k": (GGMLType.Q4_K, (2, 512), raw(GGMLType.Q4_K, 2, 2, 1)),
        "h.q5_k": (GGMLType.Q5_K, (1, 256), raw(GGMLType.Q5_K, 1, 1, 2)),
        "i.q6_k": (GGMLType.Q6_K, (2, 256), raw(GGMLType.Q6_K, 2, 1, 3)),
        "j.f32_3d": (GGMLType.F32, (2, 3, 4), f(2, 3, 4)),
        "k.q8_0_1d": (GGMLType.Q8_0, (64,), quant(GGMLType.Q8_0, f(64))),
    }


def write_sample(path, alignment: int | None = None, tensors=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub) in METADATA.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (t, shape, arr) in (sample_tensors() if tensors is None else tensors).items():
        raw_dtype = None if t in (GGMLType.F32, GGMLType.F16) else gguf.GGMLQuantizationType(int(t))
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("gguf") / "sample.gguf")


# -- well-formed files --------------------------------------------------------------------------

def check_metadata(meta: dict):
    assert meta["general.architecture"] == "llama"
    for key, (value, vtype, sub) in METADATA.items():
        got = meta[key]
        if vtype == VT.FLOAT32:
            assert type(got) is float and got == float(np.float32(value)), key
        elif sub in NP_TYPES:
            assert isinstance(got, np.ndarray) and got.dtype == NP_TYPES[sub], key
            assert np.array_equal(got, np.array(value, NP_TYPES[sub])), key
        elif key == "t.arr_arr":
            assert [a.tolist() for a in got] == value and got[0].dtype == np.int32
        else:
            assert type(got) is type(value) and got == value, key


@pytest.mark.parametrize("alignment", [None, 1, 64, 256])
def test_reads_what_gguf_writer_wrote(tmp_path, alignment):
    path = write_sample(tmp_path / "m.gguf", alignment)
    expected = sample_tensors()
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == (alignment or 32)
        assert f.data_offset % f.alignment == 0
        check_metadata(f.metadata)
        assert list(f.tensors) == list(expected)
        for name, (t, shape, arr) in expected.items():
            q = f.tensors[name]
            assert isinstance(q, QTensor) and q.ggml_type == t and q.shape == shape, name
            assert q.data.dtype == np.uint8 and not q.data.flags.writeable, name
            row_bytes = shape[-1] // BLOCK_LAYOUT[t][0] * BLOCK_LAYOUT[t][1]
            assert q.data.shape == (shape[:-1] + (row_bytes,) if len(shape) > 1 else (row_bytes,)), name
            assert q.data.tobytes() == arr.tobytes(), name
            if t in (GGMLType.F32, GGMLType.F16):
                assert np.array_equal(q.dequantize(), arr.astype(np.float32)), name
            assert_bits_equal(q.dequantize(), gguf.quants.dequantize(arr, gguf.GGMLQuantizationType(int(t))).reshape(shape))


def test_agrees_with_gguf_reader(sample):
    reader = gguf.GGUFReader(sample)
    f = GGUFFile(sample)
    assert f.data_offset == reader.data_offset and f.alignment == reader.alignment
    flat = [k for k in reader.fields if not k.startswith("GGUF.") and k != "t.arr_arr"]
    assert set(flat) | {"t.arr_arr"} == set(f.metadata)
    for key in flat:
        want, got = reader.fields[key].contents(), f.metadata[key]
        assert (np.asarray(got).tolist() if isinstance(got, np.ndarray) else got) == want, key
    assert [t.name for t in reader.tensors] == list(f.tensors)
    for rt in reader.tensors:
        q = f.tensors[rt.name]
        assert q.ggml_type == int(rt.tensor_type) and q.shape == tuple(int(d) for d in reversed(rt.shape))
        assert q.data.tobytes() == rt.data.tobytes()


def test_opening_never_writes_the_file(sample):
    before = hashlib.sha256(sample.read_bytes()).hexdigest()
    f = GGUFFile(sample)
    for q in f.tensors.values():
        q.dequantize()
        with pytest.raises(ValueError):
            q.data[...] = 0
    f.close()
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == before


def test_version_2_reads_the_same(tmp_path, sample):
    blob = bytearray(sample.read_bytes())
    blob[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(blob)
    f = GGUFFile(tmp_path / "v2.gguf")
    assert f.version == 2 and list(f.tensors) == list(sample_tensors())


def test_smollm2_header(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        assert f.metadata["general.architecture"] == "llama"
        assert len(f.metadata["tokenizer.ggml.tokens"]) == f.metadata["llama.vocab_size"] == 49152
        assert f.tensors["token_embd.weight"].shape == (49152, 576)
        assert f.tensors["blk.0.attn_k.weight"].shape == (192, 576)


# -- broken files -------------------------------------------------------------------------------

def after(blob: bytes, name: str) -> int:
    """Offset just past the (unique) GGUF string `name` in blob: a key's type or a tensor's n_dims."""
    s = struct.pack("<Q", len(name)) + name.encode()
    assert blob.count(s) == 1, name
    return blob.index(s) + len(s)


def patched(tmp_path, sample, at: int, fmt: str, value) -> str:
    blob = bytearray(sample.read_bytes())
    struct.pack_into(fmt, blob, at, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    return path


def tensor_field(blob: bytes, name: str, field: str) -> int:
    """Offset of a tensor info field: n_dims, dim0, type or offset."""
    at = after(blob, name)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    return {"n_dims": at, "dim0": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}[field]


def test_every_truncation_is_a_model_file_error(tmp_path, sample):
    blob = sample.read_bytes()
    data_end = max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(sample).tensors)
    path = tmp_path / "cut.gguf"
    for cut in range(data_end):
        path.write_bytes(blob[:cut])
        with pytest.raises(ModelFileError, match="cut.gguf"):
            GGUFFile(path)
    path.write_bytes(blob[:data_end])  # llama.cpp does not need the last tensor's padding either
    assert list(GGUFFile(path).tensors) == list(sample_tensors())


BAD_HEADERS = [  # (where, struct format, value, message pattern)
    (0, "<4s", b"GGUX", "not a GGUF file"),
    (0, "<4s", b"\x00\x00\x00\x00", "not a GGUF file"),
    (4, "<I", 99, "unsupported GGUF version 99"),
    (4, "<I", 1, "unsupported GGUF version 1"),
    (4, "<I", 3 << 24, "big-endian"),
    (8, "<Q", 2**60, "tensor count"),
    (8, "<Q", 2**64 - 1, "tensor count"),
    (16, "<Q", 2**60, "metadata count"),
    (24, "<Q", 2**62, "truncated"),  # length of the first key
]


@pytest.mark.parametrize("at, fmt, value, message", BAD_HEADERS)
def test_corrupt_header(tmp_path, sample, at, fmt, value, message):
    with pytest.raises(ModelFileError, match=message):
        GGUFFile(patched(tmp_path, sample, at, fmt, value))


@pytest.mark.parametrize("key, delta, fmt, value, message", [
    ("general.architecture", 4, "<Q", 2**62, "truncated"),        # string value length
    ("t.str", 4, "<Q", 10**6, "truncated"),
    ("t.arr_str", 8, "<Q", 2**61, "array length"),               # array lengths
    ("t.arr_i64", 8, "<Q", 2**61, "array length"),
    ("t.arr_u16", 8, "<Q", 2**63, "array length"),
    ("t.arr_arr", 8, "<Q", 2**60, "array length"),
    ("t.u32", 0, "<I", 13, "unknown value type 13"),              # value types
    ("t.str", 0, "<I", 2**31, "unknown value type"),
    ("t.arr_i32", 4, "<I", 99, "unknown array item type 99"),
])
def test_corrupt_metadata(tmp_path, sample, key, delta, fmt, value, message):
    at = after(sample.read_bytes(), key) + delta
    with pytest.raises(ModelFileError, match=message):
        GGUFFile(patched(tmp_path, sample, at, fmt, value))


@pytest.mark.parametrize("name, field, fmt, value, message", [
    ("d.q8_0", "offset", "<Q", 2**40, "runs past the end"),
    ("k.q8_0_1d", "offset", "<Q", 2**64 - 32, "runs past the end"),
    ("d.q8_0", "offset", "<Q", 33, "not a multiple of the alignment"),
    ("c.bf16", "offset", "<Q", 0, "overlap"),
    ("a.f32", "n_dims", "<I", 0, "0 dimensions"),
    ("a.f32", "n_dims", "<I", 5, "5 dimensions"),
    ("a.f32", "n_dims", "<I", 2**32 - 1, "dimensions"),
    ("a.f32", "dim0", "<Q", 0, "bad dims"),
    ("d.q8_0", "dim0", "<Q", 48, "bad dims"),                    # not whole Q8_0 blocks
    ("d.q8_0", "dim0", "<Q", 2**62, "runs past the end"),
])
def test_corrupt_tensor_info(tmp_path, sample, name, field, fmt, value, message):
    at = tensor_field(sample.read_bytes(), name, field)
    with pytest.raises(ModelFileError, match=message):
        GGUFFile(patched(tmp_path, sample, at, fmt, value))


def test_unknown_quant_type_fails_at_open_naming_the_tensor(tmp_path, sample):
    at = tensor_field(sample.read_bytes(), "e.q4_0", "type")
    with pytest.raises(UnsupportedModelError, match=r"tensor 'e\.q4_0' has ggml type 99, unknown"):
        GGUFFile(patched(tmp_path, sample, at, "<I", 99))


@pytest.mark.parametrize("type_id, type_name, dim0", [(25, "I16", 16), (28, "F64", 2), (24, "I8", 16)])
def test_unsupported_quant_type_is_listed_then_refused_naming_the_tensor(tmp_path, sample, type_id,
                                                                         type_name, dim0):
    """A known type torchless cannot compute with still parses (so `inspect` can list it); only
    asking for the tensors refuses it. dim0 keeps the tensor within its 64 aligned bytes."""
    blob = sample.read_bytes()
    path = patched(tmp_path, sample, tensor_field(blob, "e.q4_0", "type"), "<I", type_id)
    path = patched(tmp_path, path, tensor_field(blob, "e.q4_0", "dim0"), "<Q", dim0)
    f = GGUFFile(path)
    assert f.tensor_infos["e.q4_0"].ggml_type.name == type_name
    with pytest.raises(UnsupportedModelError, match=rf"tensor 'e\.q4_0': quantization type {type_name} \({type_id}\)"):
        f.tensors


def test_duplicate_tensor_and_key_names(tmp_path, sample):
    blob = sample.read_bytes()
    dup = blob.replace(b"b.f16", b"a.f32")  # 'b.f16' only occurs as a tensor name
    (tmp_path / "dup.gguf").write_bytes(dup)
    with pytest.raises(ModelFileError, match="duplicate tensor name 'a.f32'"):
        GGUFFile(tmp_path / "dup.gguf")
    (tmp_path / "dupkey.gguf").write_bytes(blob.replace(b"t.i16", b"t.u16"))
    with pytest.raises(ModelFileError, match="duplicate metadata key 't.u16'"):
        GGUFFile(tmp_path / "dupkey.gguf")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path, alignment):
    path = write_sample(tmp_path / "a.gguf", 64)
    at = after(path.read_bytes(), "general.alignment") + 4
    with pytest.raises(ModelFileError, match="general.alignment"):
        GGUFFile(patched(tmp_path, path, at, "<I", alignment))


def test_unopenable_files(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.gguf: truncated"):
        GGUFFile(tmp_path / "empty.gguf")
    with pytest.raises(ModelFileError, match="missing.gguf: cannot open"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="cannot open"):
        GGUFFile(tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_corruption_fails_cleanly(tmp_path, sample, data):
    """Any damage to the header, metadata or tensor infos opens fine or raises a TorchlessError."""
    blob = bytearray(sample.read_bytes())
    header_end = GGUFFile(sample).data_offset
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        blob[at] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(blob)
    try:
        GGUFFile(path)
    except TorchlessError:
        pass


def test_inspect_lists_any_gguf_that_parses_by_type(tmp_path, sample, capsys):
    """Unsupported types and metadata that cannot make a model are listed, not refused."""
    from torchless.cli import main

    blob = sample.read_bytes()
    path = patched(tmp_path, sample, tensor_field(blob, "e.q4_0", "type"), "<I", 6)  # Q5_0
    path = patched(tmp_path, path, tensor_field(blob, "e.q4_0", "dim0"), "<Q", 32)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torchless cannot run this file" in out  # the sample has no model metadata
    by_type = out[out.index("by type:"):]
    assert re.search(r"\n  Q5_0 +1 +44 B +\S+ +\S+ +\S+\n", by_type), by_type  # and its packed size
