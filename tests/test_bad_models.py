"""Well-formed files that torchless cannot run, and configs that cannot describe a model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from torchless import ModelConfig, ModelFileError, Parameters, UnsupportedModelError


def write_minimal_gguf(path, arch="llama", **metadata):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_unknown_gguf_architecture(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        Parameters.load(path)


def test_gguf_missing_hyperparameters(tmp_path):
    path = write_minimal_gguf(tmp_path / "m.gguf", embedding_length=8)
    with pytest.raises(ModelFileError, match="GGUF metadata is missing llama\\.attention\\.head_count"):
        Parameters.load(path)


def test_unknown_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
        Parameters.load(tmp_path)


def test_hf_config_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFileError, match="config.json is missing 'hidden_size'"):
        Parameters.load(tmp_path)


def test_hf_folder_without_weights(tiny_models, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_models["llama"][1] / "config.json").read_bytes())
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        Parameters.load(tmp_path)


def test_truncated_safetensors(tiny_models, tmp_path):
    folder = tiny_models["llama"][1]
    for name in ("config.json",):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="do not fit"):
        Parameters.load(tmp_path)


@pytest.mark.parametrize("field,value", [("n_heads", 0), ("hidden_size", -1), ("n_kv_heads", 3)])
def test_inconsistent_config(field, value):
    base = dict(architecture="llama", hidden_size=64, intermediate_size=96, n_layers=2, n_heads=8,
                n_kv_heads=2, head_dim=8, vocab_size=10, context_length=32)
    base[field] = value
    with pytest.raises(ModelFileError):
        ModelConfig(**base)


def test_missing_tensor_names_the_tensor(tiny_models, tmp_path):
    from torchless import Mistral

    params = Parameters.load(tiny_models["llama"][2])
    del params.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(ModelFileError, match="missing tensor blk.1.ffn_up.weight"):
        Mistral.load(params)
