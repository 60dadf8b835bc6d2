"""Shared fixtures: the real SmolLM2 file, and tiny random-weight models with their oracles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_factory import make_hf_model, save_hf_folder, tokenizer_metadata_of, write_gguf


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model, pulled into the user cache on first use (as a user would get it)."""
    from torchless.hub import resolve_model

    return resolve_model(os.environ.get("TORCHLESS_SMOLLM2", "smollm2"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: (hf_model, safetensors_folder, gguf_path)} for mistral, llama and qwen2."""
    out = {}
    for arch in ("mistral", "llama", "qwen2"):
        root = tmp_path_factory.mktemp(arch)
        model = make_hf_model(arch, seed=1)
        out[arch] = (model, save_hf_folder(model, root / "hf"), write_gguf(model, root / "model.gguf"))
    return out


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, smollm2_path) -> Path:
    """A small random llama GGUF with SmolLM2's real tokenizer, for fast end-to-end tests."""
    meta = tokenizer_metadata_of(smollm2_path)
    model = make_hf_model("llama", seed=2, vocab_size=len(meta["tokenizer.ggml.tokens"]),
                          max_position_embeddings=256, tie_word_embeddings=True)
    return write_gguf(model, tmp_path_factory.mktemp("tiny_llama") / "tiny.gguf",
                      quant="Q8_0", tokenizer_metadata=meta)
