"""Parameters: a model file, folder or short name -> ModelConfig + named tensors + tokenizer.

Names are GGUF's own. Hugging Face names are mapped to them here, once, with the one table below.
"""

from __future__ import annotations

import json
import mmap
import re
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np

from .config import ModelConfig
from .errors import ModelFileError, TorchlessError, shown
from .formats.gguf import GGUFFile
from .formats.safetensors import read_safetensors
from .quant import QTensor, count_nonfinite_scales

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
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    # Mixtral's router; its experts: _HF_EXPERT (one tensor per expert, as checkpoints store
    # them) or transformers >= 5's in-memory layout, stacked (gate and up fused in one tensor)
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
# per-expert tensors -> old llama.cpp Mixtral names (blk.N.ffn_gate.E.weight), which moe.py reads
_HF_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_EXPERT_KINDS = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# Gemma's sandwich norms, as gguf-py's tensor map names them for gemma3: its
# post_attention_layernorm is a block's output norm, not the MLP's input norm.
_HF_LAYER_TO_GGUF_BY_ARCH = {"gemma3": {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}}
# the text model inside a multimodal checkpoint (Gemma3ForConditionalGeneration, transformers
# >= 4.52 and before)
_HF_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."))
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLOCK = re.compile(r"blk\.([0-9]{1,9})\.")  # longer numbers cannot be a block of a real model


def hf_to_gguf_name(name: str, arch: str = "llama") -> str | None:
    """The GGUF name of a Hugging Face tensor of an `arch` model (None: not a weight we use)."""
    for prefix, replacement in _HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
    if name in _HF_TO_GGUF:
        return _HF_TO_GGUF[name]
    m = _HF_LAYER.fullmatch(name)
    layer_names = {**_HF_LAYER_TO_GGUF, **_HF_LAYER_TO_GGUF_BY_ARCH.get(arch, {})}
    if m and m.group(2) in layer_names:
        return f"blk.{m.group(1)}.{layer_names[m.group(2)]}"
    if m and (e := _HF_EXPERT.fullmatch(m.group(2))):
        return f"blk.{m.group(1)}.{_EXPERT_KINDS[e.group(2)]}.{e.group(1)}.weight"
    return None  # e.g. rotary inv_freq buffers, a vision tower: not weights we use


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """A GGUF file's ModelConfig: its metadata, and llama.cpp's llama3 RoPE factors (the small
    f32 tensor `rope_freqs.weight`) when it has them."""
    rope_freqs = None
    if "rope_freqs.weight" in gguf.tensor_infos:
        rope_freqs = gguf.tensors["rope_freqs.weight"].dequantize()
    return ModelConfig.from_gguf(gguf.metadata, gguf.tensor_infos.keys(), rope_freqs)


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
        try:
            if path.is_dir():
                params = cls._load_hf_folder(path)
            else:
                gguf = GGUFFile(path)
                params = cls(path, gguf_config(gguf), gguf.tensors, gguf.metadata, gguf)
            check_tensors(params.config, params.tensors)
        except TorchlessError as e:
            message = str(e)  # the readers name the file already; the checks of values do not
            raise type(e)(message if message.startswith(str(path)) else f"{path}: {message}") from None
        return params

    @classmethod
    def _load_hf_folder(cls, folder: Path) -> "Parameters":
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelFileError(f"{folder}: not a model folder (no config.json)")
        hf_config = read_json(config_path)
        config = ModelConfig.from_hf(hf_config)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            index_json = read_json(index)
            weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ModelFileError(f"{index}: not a valid safetensors index (weight_map must map "
                                     "tensor names to file names)")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{folder}: no *.safetensors files")
        tensors = {}
        for file in files:
            if not _stays_inside(file):
                raise ModelFileError(f"{index}: {shown(file)} is not a file name inside the model folder")
            if not (folder / file).is_file():
                raise ModelFileError(f"{folder}: the index names {shown(file)}, which is missing")
            for name, tensor in read_safetensors(folder / file).items():
                gguf_name = hf_to_gguf_name(name, config.architecture)
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


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: not valid UTF-8 JSON ({type(e).__name__}: {e})") from None


def _stays_inside(name: str) -> bool:
    """Whether a file name from an index stays in the model folder: relative, no `..`. Checked on
    the name, not on the resolved path, so that a folder of symlinks (a Hugging Face snapshot,
    whose files link to ../../blobs) still loads."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts \
        and "\\" not in name and "\0" not in name


def check_tensors(config: ModelConfig, tensors: dict[str, QTensor]) -> None:
    """Refuse what would load and then compute garbage: tensors of blocks other than the
    config's, and NaN or infinite values in norm weights (small: read whole) or in the scales
    of quantized blocks (read at a fraction of the cost of the repack that follows)."""
    blocks = {int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))}
    if blocks and (len(blocks) != config.n_layers or max(blocks) != config.n_layers - 1):
        raise ModelFileError(f"block_count is {config.n_layers}, but the file has tensors for "
                             f"{len(blocks)} blocks numbered {min(blocks)}..{max(blocks)}")
    for name, tensor in tensors.items():
        if name.endswith("norm.weight") and not np.isfinite(tensor.dequantize()).all():
            raise ModelFileError(f"tensor {shown(name)} (a norm weight) holds NaN or infinite values")
        bad = count_nonfinite_scales(tensor)
        release_pages(tensor.data)  # a tensor-parallel rank repacks only its share of the file
        if bad:
            raise ModelFileError(f"tensor {shown(name)}: {bad} blocks have a NaN or infinite scale")


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
