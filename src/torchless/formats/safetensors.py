"""Safetensors reader: memory-mapped, zero-copy views as QTensors.

The `safetensors` package cannot hand BF16 to NumPy, and we want raw bytes anyway (a BF16 weight
stays BF16 in memory), so the format is read here: an 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then the tensor bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError
from ..quant import GGMLType, QTensor

_DTYPES = {"F32": (GGMLType.F32, 4), "F16": (GGMLType.F16, 2), "BF16": (GGMLType.BF16, 2)}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | Path) -> dict[str, QTensor]:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path}: truncated safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ModelFileError(f"{path}: corrupt safetensors header length {header_len}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    data_len = size - data_start
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {name} has dtype {dtype}; supported: {', '.join(_DTYPES)}")
        ggml_type, itemsize = _DTYPES[dtype]
        n = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= data_len) or end - begin != n * itemsize:
            raise ModelFileError(f"{path}: tensor {name} data offsets {begin}..{end} do not fit "
                                 f"its shape {shape} or the file ({data_len} data bytes)")
        data = raw[begin:end]
        if len(shape) == 2:
            data = data.reshape(shape[0], shape[1] * itemsize)
        tensors[name] = QTensor(ggml_type, tuple(shape), data)
    return tensors
