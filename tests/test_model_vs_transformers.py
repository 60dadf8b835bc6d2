"""Logits against Hugging Face transformers (CPU torch): the oracle nobody here wrote."""

from __future__ import annotations

import numpy as np
import pytest

from model_factory import hf_logits, make_hf_model, write_gguf
from torchless import InferenceState, Mistral, Parameters
from torchless.kernels import gemm

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


@pytest.fixture(scope="module")
def q5_model(tmp_path_factory):
    """A tiny llama GGUF mixing Q5_0 (attention, embedding) and Q5_1 (FFN, LM head), and
    transformers loading that same file (its GGUF loader dequantizes with gguf-py)."""
    import torch
    import transformers

    from model_factory import mixed_q5_quant

    root = tmp_path_factory.mktemp("q5")
    path = write_gguf(make_hf_model("llama", seed=4), root / "q5.gguf", quant=mixed_q5_quant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, dtype=torch.float32)
    hf.config._attn_implementation = "eager"
    return path, hf.eval()


Q5_SEQ = [int(t) for t in np.random.default_rng(5).integers(0, 300, 72)]  # one prefill chunk


def _check_every_path(model, seq, ref):
    """Logits of every product path against `ref` (transformers' logits of the 72-token seq): the
    reference path, the fused decode blocks (matvec), seq as one prefill chunk (the float
    batched kernels, and BLAS with its threshold lowered), chunks of 5 (expanded float tiles)
    and 3 (the direct kernels), and a batched decode step of two sequences (the fused batch blocks)."""
    from torchless.model.mistral import Span

    state = InferenceState(model.config)
    assert_close_rel(np.stack([model.forward(state, t).copy() for t in seq[:12]]), ref[:12], 1e-4)
    state = InferenceState(model.config)
    assert_close_rel(np.stack([model.fast_forward(state, t).copy() for t in seq[:12]]), ref[:12], 1e-4)
    state = InferenceState(model.config)
    assert_close_rel(model.prefill(state, seq, all_logits=True), ref, 1e-4)
    with pytest.MonkeyPatch.context() as mp:  # the same chunk through BLAS, as longer chunks go
        mp.setattr(gemm, "MIN_TOKENS_FOR_BLAS", 64)
        state = InferenceState(model.config)
        assert_close_rel(model.prefill(state, seq, all_logits=True), ref, 1e-4)
    for chunk in (5, 3):  # the float batched kernels, the integer ones
        state = InferenceState(model.config)
        assert_close_rel(model.prefill(state, seq[:20], chunk_size=chunk, all_logits=True), ref[:20], 1e-4)

    a, b = InferenceState(model.config), InferenceState(model.config)
    model.prefill(a, seq[:9])
    model.prefill(b, seq[:4])
    both = model.forward_spans([Span(a, [seq[9]], 9), Span(b, [seq[4]], 4)], fast=True)
    assert_close_rel(both[0], ref[9], 1e-4)
    assert_close_rel(both[1], ref[4], 1e-4)


def test_q5_0_q5_1_gguf_every_path_matches_transformers(q5_model, capsys):
    """Every product path (_check_every_path) on Q5_0/Q5_1 weights against transformers on the
    same GGUF file, and `inspect` counting the tensors of each type."""
    from torchless import cli

    path, hf = q5_model
    params = Parameters.load(path)
    types = {name: t.ggml_type.name for name, t in params.tensors.items() if t.data.ndim == 2}
    assert set(types.values()) == {"Q5_0", "Q5_1"}, types
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q5_1"
    ref = hf_logits(hf, Q5_SEQ)
    model = Mistral.load(params)

    _check_every_path(model, Q5_SEQ, ref)

    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    by_type = out[out.index("by type:"):].splitlines()
    assert any(l.split()[:2] == ["Q5_0", "9"] for l in by_type), by_type  # embedding + 2 x 4 attention
    assert any(l.split()[:2] == ["Q5_1", "7"] for l in by_type), by_type  # 2 x 3 FFN + LM head


def _random_mixed_gguf_and_transformers(root, mix, seed):
    """A tiny random llama GGUF whose 2-D weights are of the types `mix` gives per name, and
    transformers loading that same file (its GGUF loader dequantizes with gguf-py)."""
    import torch
    import transformers

    from model_factory import write_random_gguf

    path = write_random_gguf(root / "m.gguf", mix, seed=seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, dtype=torch.float32)
    hf.config._attn_implementation = "eager"
    return path, hf.eval()


def _every_path_matches_transformers(path, hf, capsys, counts, kinds=("q8",)):
    """As the Q5_0/Q5_1 test: every product path (reference, fused decode, a 72-token prefill
    chunk through the float batched kernels and through BLAS, chunks of 5 and 3 (float and
    integer batched kernels), a batched decode step of two sequences) against
    transformers on the same file; the weights repacked as `kinds`; `inspect` lists each type
    with its tensor count."""
    from torchless import cli

    params = Parameters.load(path)
    types = {name: t.ggml_type.name for name, t in params.tensors.items() if t.data.ndim == 2}
    assert set(types.values()) == set(counts), types
    seq = [int(t) for t in np.random.default_rng(7).integers(0, 320, 72)]  # one prefill chunk
    ref = hf_logits(hf, seq)
    model = Mistral.load(params)
    assert {lin.packed.kind for lin in model.linears()} == set(kinds)

    _check_every_path(model, seq, ref)

    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    by_type = out[out.index("by type:"):].splitlines()
    for name, count in counts.items():
        assert any(l.split()[:2] == [name, str(count)] for l in by_type), by_type


def test_q2_k_q3_k_iq4_nl_iq4_xs_gguf_every_path_matches_transformers(tmp_path_factory, capsys):
    """Q2_K, Q3_K, IQ4_NL and IQ4_XS weights (random blocks: gguf-py cannot quantize these)."""
    from model_factory import mixed_low_bit_quant

    path, hf = _random_mixed_gguf_and_transformers(tmp_path_factory.mktemp("lowbit"), mixed_low_bit_quant, 6)
    _every_path_matches_transformers(path, hf, capsys, {"Q2_K": 5, "Q3_K": 3, "IQ4_NL": 4, "IQ4_XS": 4},
                                     kinds=("q4",))  # 2-, 3-bit and IQ4 codes packed


def test_tq1_0_tq2_0_mxfp4_gguf_every_path_matches_transformers(tmp_path_factory, capsys):
    """TQ1_0, TQ2_0 and MXFP4 weights (quantized from random floats by gguf-py)."""
    from model_factory import mixed_ternary_mxfp4_quant

    path, hf = _random_mixed_gguf_and_transformers(tmp_path_factory.mktemp("tq"), mixed_ternary_mxfp4_quant, 8)
    _every_path_matches_transformers(path, hf, capsys, {"TQ1_0": 6, "TQ2_0": 4, "MXFP4": 6})


def test_iq_lattice_types_gguf_every_path_matches_transformers(tmp_path_factory, capsys):
    """IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M weights (random blocks)."""
    from model_factory import mixed_iq_quant

    path, hf = _random_mixed_gguf_and_transformers(tmp_path_factory.mktemp("iq"), mixed_iq_quant, 9)
    _every_path_matches_transformers(path, hf, capsys, {"IQ3_S": 3, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ3_XXS": 2,
                                                         "IQ2_S": 3, "IQ1_S": 2, "IQ1_M": 2})
