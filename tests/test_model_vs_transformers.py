"""Logits against Hugging Face transformers (CPU torch): the oracle nobody here wrote."""

from __future__ import annotations

import numpy as np
import pytest

from model_factory import hf_logits, make_hf_model, write_gguf
from torchless import InferenceState, Mistral, Parameters

SEQ = [5, 17, 101, 3, 250, 42, 42, 7, 199, 64, 12, 0, 299, 150, 77, 8, 31, 2, 90, 11]  # > window of 7


def assert_close_rel(ours, ref, rel):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def run_token_by_token(path, ids):
    model = Mistral.load(Parameters.load(path))
    state = InferenceState(model.config)
    out = []
    for t in ids:
        model.forward(state, t)
        out.append(state.logits.copy())
    return np.stack(out)


@pytest.mark.parametrize("arch", ["mistral", "llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_every_position_matches_transformers(tiny_models, arch, fmt):
    hf_model, folder, gguf_path = tiny_models[arch]
    ours = run_token_by_token(folder if fmt == "safetensors" else gguf_path, SEQ)
    assert_close_rel(ours, hf_logits(hf_model, SEQ), 1e-4)


def test_config_read_from_files(tiny_models):
    for fmt in (1, 2):
        cfg = Parameters.load(tiny_models["mistral"][fmt]).config
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.sliding_window) == (8, 2, 7)
    assert Parameters.load(tiny_models["qwen2"][1]).config.attention_bias
    assert Parameters.load(tiny_models["qwen2"][2]).config.attention_bias


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_prefill_in_chunks_matches_transformers(tiny_models, arch):
    """Chunks longer and shorter than the sliding window, through the ring-buffer cache."""
    hf_model, _, gguf_path = tiny_models[arch]
    model = Mistral.load(Parameters.load(gguf_path))
    state = InferenceState(model.config)
    ours = np.concatenate([model.prefill(state, SEQ[:9], all_logits=True),
                           model.prefill(state, SEQ[9:], chunk_size=4, all_logits=True)])
    assert_close_rel(ours, hf_logits(hf_model, SEQ), 1e-4)


def test_tied_embeddings_and_quantized_gguf(tmp_path):
    """Q8_0 weights: the oracle is transformers on the same dequantized weights."""
    import gguf
    import torch

    hf_model = make_hf_model("llama", seed=3, tie_word_embeddings=True)
    path = write_gguf(hf_model, tmp_path / "q8.gguf", quant="Q8_0")
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    ours = run_token_by_token(path, SEQ[:10])
    assert_close_rel(ours, hf_logits(hf_model, SEQ[:10]), 1e-4)


def test_sliding_window_changes_the_result(tiny_models):
    """The window matters on this sequence, so the tests above do check it."""
    hf_model, folder, _ = tiny_models["mistral"]
    full = make_hf_model("mistral", seed=1, sliding_window=None)
    assert not np.allclose(hf_logits(full, SEQ)[-1], hf_logits(hf_model, SEQ)[-1], rtol=1e-3)
