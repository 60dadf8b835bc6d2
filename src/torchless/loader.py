"""Parameters: a model file, folder or short name -> ModelConfig + named tensors + tokenizer.

Names are GGUF's own. Hugging Face names are mapped to them here, once, with the one table below.
"""

from __future__ import annotations

import json
import mmap
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFileError
from .formats.gguf import GGUFFile
from .formats.safetensors import read_safetensors
from .quant import QTensor

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_gguf_name(name: str) -> str | None:
    if name in _HF_TO_GGUF:
        return _HF_TO_GGUF[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _HF_LAYER_TO_GGUF:
        return f"blk.{m.group(1)}.{_HF_LAYER_TO_GGUF[m.group(2)]}"
    return None  # e.g. rotary inv_freq buffers: not weights we use


class Parameters:
    """What a model file holds: config, memory-mapped tensors (stored format), tokenizer source."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, QTensor],
                 metadata: dict, source=None):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.metadata = metadata
        self._source = source  # the open GGUFFile, kept alive for its memory map

    @classmethod
    def load(cls, path_or_name) -> "Parameters":
        from .hub import resolve_model

        path = resolve_model(str(path_or_name))
        if path.is_dir():
            return cls._load_hf_folder(path)
        gguf = GGUFFile(path)
        config = ModelConfig.from_gguf(gguf.metadata, gguf.tensors.keys())
        return cls(path, config, gguf.tensors, gguf.metadata, gguf)

    @classmethod
    def _load_hf_folder(cls, folder: Path) -> "Parameters":
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelFileError(f"{folder}: not a model folder (no config.json)")
        try:
            hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{config_path}: invalid JSON ({e})") from None
        config = ModelConfig.from_hf(hf_config)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise ModelFileError(f"{index}: not a valid safetensors index") from None
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{folder}: no *.safetensors files")
        tensors = {}
        for file in files:
            if not (folder / file).is_file():
                raise ModelFileError(f"{folder}: the index names {file}, which is missing")
            for name, tensor in read_safetensors(folder / file).items():
                gguf_name = hf_to_gguf_name(name)
                if gguf_name is not None:
                    tensors[gguf_name] = tensor
        return cls(folder, config, tensors, {"hf_config": hf_config})

    @cached_property
    def tokenizer(self):
        from .tokenizer import Tokenizer

        if self.path.is_dir():
            if not (self.path / "tokenizer.json").is_file():
                raise ModelFileError(f"{self.path}: no tokenizer.json")
            return Tokenizer.from_tokenizer_json(self.path / "tokenizer.json")
        return Tokenizer.from_gguf_metadata(self.metadata)

    def release_pages(self):
        """Drop the file's pages from this process's resident memory once the weights have been
        repacked; the mapping stays valid, and a later read faults pages back in from the file."""
        for tensor in self.tensors.values():
            release_pages(tensor.data)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def release_pages(array) -> None:
    """madvise(DONTNEED) the pages under a view of a read-only file mapping. Harmless to the
    mapping's other views: a dropped page is read back from the file when next touched."""
    base = array
    while base is not None and not hasattr(base, "_mmap"):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or array.nbytes == 0:
        return
    page = mmap.PAGESIZE
    low, high = _byte_bounds(array)  # a column slice is strided: release all it spans
    offset = low - base.__array_interface__["data"][0] + base.offset
    start = offset // page * page
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), offset + high - low) - start)
    except (OSError, ValueError):
        pass  # only a memory saving; never a reason to fail


def _byte_bounds(array) -> tuple[int, int]:
    try:
        return np.lib.array_utils.byte_bounds(array)  # NumPy >= 2
    except AttributeError:
        return np.byte_bounds(array)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim). Repacking a model
    frees many large temporaries, and glibc keeps them mapped once its mmap threshold has grown;
    without this a tensor-parallel rank would keep tens of MB it no longer uses."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: only a memory saving
