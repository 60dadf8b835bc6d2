"""Safetensors reader: memory-mapped, zero-copy views as QTensors.

The `safetensors` package cannot hand BF16 to NumPy, and we want raw bytes anyway (a BF16 weight
stays BF16 in memory), so the format is read here: an 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then the tensor bytes. Every header value is
type-checked before use: the header is as untrusted as the rest of the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError, shown
from ..quant import GGMLType, QTensor

_DTYPES = {"F32": (GGMLType.F32, 4), "F16": (GGMLType.F16, 2), "BF16": (GGMLType.BF16, 2)}
_MAX_HEADER = 100 * 1024 * 1024


def _is_count(value) -> bool:
    """A JSON non-negative integer: not a bool, not 64.5, not a string."""
    return type(value) is int and value >= 0


def read_safetensors(path: str | Path) -> dict[str, QTensor]:
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{where}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ModelFileError(f"{where}: corrupt safetensors header length {header_len}")
            header_bytes = f.read(header_len)
    except OSError as e:
        raise ModelFileError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{where}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    data_len = size - data_start
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensor = f"{where}: tensor {shown(name)}"
        if not isinstance(info, dict):
            raise ModelFileError(f"{tensor}: corrupt entry {shown(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(map(_is_count, shape))):
            raise ModelFileError(f"{tensor}: shape must be a list of non-negative integers, got {shown(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise ModelFileError(f"{tensor}: data_offsets must be two non-negative integers, "
                                 f"got {shown(offsets)}")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise UnsupportedModelError(f"{tensor} has dtype {shown(dtype)}; supported: {', '.join(_DTYPES)}")
        ggml_type, itemsize = _DTYPES[dtype]
        begin, end = offsets
        if not begin <= end <= data_len or end - begin != math.prod(shape) * itemsize:
            raise ModelFileError(f"{tensor}: data offsets {begin}..{end} do not fit "
                                 f"its shape {shape} or the file ({data_len} data bytes)")
        data = raw[begin:end]
        if len(shape) == 2:
            data = data.reshape(shape[0], shape[1] * itemsize)
        tensors[name] = QTensor(ggml_type, tuple(shape), data)
    return tensors
