"""GGUF v2/v3 reader: header, metadata, and tensors as zero-copy QTensor views of a memory map.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count
(key string, u32 value type, value); tensor_count (name string, u32 n_dims, u64 dims[n_dims]
innermost first, u32 ggml type, u64 offset); padding to `general.alignment`; tensor data.
A string is u64 length + UTF-8 bytes; an array is u32 item type + u64 count + items.

Everything read from the file is checked before it is trusted, so a truncated or corrupt file
gives one ModelFileError naming the file and the problem, never an allocation of 2**60 bytes.
"""

from __future__ import annotations

import math
import struct
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError, shown
from ..quant import STORAGE_LAYOUT, GGMLType, QTensor, supported_type

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays; real files use none, a corrupt one could recurse forever

# value type id -> (struct format, numpy dtype); 8 = string and 9 = array are handled apart.
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
            4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"),
            10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8")}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_KNOWN_TYPES = frozenset(GGMLType)


class TensorInfo(NamedTuple):
    """Where a tensor lies in the file and what it is, whether or not torchless can compute with it."""
    ggml_type: GGMLType
    shape: tuple[int, ...]  # NumPy order: GGUF's dims reversed
    start: int              # absolute byte offsets in the file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to run past its end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, problem: str):
        raise ModelFileError(f"{self.path}: {problem}")

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining():
            self.fail(f"truncated file: {what} at offset {self.pos} needs {n} bytes, "
                      f"{self.remaining()} left")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        # surrogateescape: keep bytes that are not UTF-8 (some tokenizer vocabularies) recoverable
        return str(self.take(n, what), "utf-8", "surrogateescape")

    def count(self, min_item_bytes: int, what: str) -> int:
        """A u64 count, checked against the bytes left before anything is allocated for it."""
        n = self.scalar("<Q", what)
        if n * min_item_bytes > self.remaining():
            self.fail(f"{what} {n} cannot fit in the {self.remaining()} bytes left (corrupt file)")
        return n

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], what)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            self.fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
        itype = self.scalar("<I", f"item type of {what}")
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype][1])
            n = self.count(dtype.itemsize, f"array length of {what}")
            a = np.frombuffer(self.take(n * dtype.itemsize, what), dtype).astype(dtype.newbyteorder("="))
            return a != 0 if itype == _BOOL else a
        if itype not in (_STRING, _ARRAY):
            self.fail(f"{what} has unknown array item type {itype}")
        n = self.count(8 if itype == _STRING else 12, f"array length of {what}")
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensor_infos` (name -> TensorInfo, file
    order, any known ggml type) and `tensors` (name -> QTensor, which refuses a type torchless
    cannot compute with).

    Tensor data stays in the read-only memory map; the QTensors are views into it, so they stay
    valid as long as they are referenced, even after close().
    """

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            size = path.stat().st_size
            # A zero-length file cannot be mapped; an empty buffer reports the truncation instead.
            self._map = np.memmap(path, np.uint8, mode="r").view(np.ndarray) if size else np.zeros(0, np.uint8)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot open ({e.strerror or e})") from None
        cur = _Cursor(memoryview(self._map), path)

        if bytes(cur.take(4, "magic")) != MAGIC:
            cur.fail(f"not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected {MAGIC!r})")
        self.version = cur.scalar("<I", "version")
        if self.version not in VERSIONS:
            hint = " (a big-endian file?)" if self.version.to_bytes(4, "big")[0] in VERSIONS else ""
            cur.fail(f"unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        # Smallest possible tensor info: empty name, 1 dim, type, offset. Smallest kv: empty key,
        # type, one byte of value.
        n_tensors = cur.count(8 + 4 + 8 + 4 + 8, "tensor count")
        n_kv = cur.count(8 + 4 + 1, "metadata count")

        self.metadata: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                cur.fail(f"duplicate metadata key {shown(key)}")
            vtype = cur.scalar("<I", f"value type of metadata {shown(key)}")
            self.metadata[key] = cur.value(vtype, f"metadata {shown(key)}")

        self.alignment = self.metadata.get("general.alignment", 32)
        if type(self.alignment) is not int or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            cur.fail(f"general.alignment {self.alignment!r} is not a positive power of two")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.scalar("<I", f"n_dims of tensor {shown(name)}")
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(f"tensor {shown(name)} has {n_dims} dimensions (must be 1..{MAX_DIMS})")
            dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"dims of tensor {shown(name)}"))
            type_id = cur.scalar("<I", f"type of tensor {shown(name)}")
            if type_id not in _KNOWN_TYPES:  # its size is unknown too, so the file cannot be read
                raise UnsupportedModelError(f"{path}: tensor {shown(name)} has ggml type {type_id}, "
                                            "unknown to torchless")
            offset = cur.scalar("<Q", f"data offset of tensor {shown(name)}")
            infos.append((name, dims, GGMLType(type_id), offset))

        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensor_infos: dict[str, TensorInfo] = {}
        for name, dims, gtype, offset in infos:
            block_size, type_size = STORAGE_LAYOUT[gtype]
            name_shown = shown(name)
            if name in self.tensor_infos:
                cur.fail(f"duplicate tensor name {name_shown}")
            if min(dims) < 1 or dims[0] % block_size:
                cur.fail(f"tensor {name_shown} has bad dims {list(dims)} for {gtype.name} "
                         f"(each >= 1, the first a multiple of {block_size})")
            if offset % self.alignment:
                cur.fail(f"tensor {name_shown} data offset {offset} is not a multiple of the "
                         f"alignment {self.alignment}")
            start = self.data_offset + offset
            nbytes = math.prod(dims) // block_size * type_size
            if start + nbytes > size:
                cur.fail(f"truncated file: tensor {name_shown} data ({nbytes} bytes at offset {start}) "
                         f"runs past the end of the file ({size} bytes)")
            self.tensor_infos[name] = TensorInfo(gtype, dims[::-1], start, start + nbytes)
        spans = sorted((info.start, info.stop, name) for name, info in self.tensor_infos.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                cur.fail(f"tensors {shown(a)} and {shown(b)} overlap in the file")

    @cached_property
    def tensors(self) -> dict[str, QTensor]:
        """Every tensor as a QTensor view; UnsupportedModelError names the first of a type that
        torchless cannot compute with."""
        return {name: QTensor(supported_type(info.ggml_type, name), info.shape,
                              self._map[info.start:info.stop])
                for name, info in self.tensor_infos.items()}

    def close(self):
        """Drop this object's references; the map closes once no tensor view is left."""
        self.tensors, self.tensor_infos, self._map = {}, {}, None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"
