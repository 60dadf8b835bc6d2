"""RoPE scaling (linear, llama3, YaRN) and an explicit head_dim, against transformers (CPU torch).

Each tiny model is trained-context short (original_max_position_embeddings 16 or 32) and run on
40 tokens, so the scaled frequencies decide the logits; every run path (prefill in chunks, the
reference and the compiled decode steps, a micro-batch of sequences, tensor-parallel shards, a
pipeline) is held to transformers at every position, from safetensors and from GGUF as
llama.cpp's converter writes it (rope.scaling.* keys; llama3 as the rope_freqs.weight tensor).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model_factory import hf_logits, make_hf_model, save_hf_folder, write_gguf_with_rope
from torchless import InferenceState, Mistral, ModelConfig, Parameters, TorchlessError, UnsupportedModelError
from torchless.config import RopeScaling

SEQ = [int(t) for t in np.random.default_rng(12).integers(0, 300, 40)]
SMALL_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)  # head_dim 16: 8 rotary pairs

# name -> (architecture, transformers config overrides, formats)
CASES = {
    # original context 32: pair 0 kept (wavelength 6.3 < 32/4), pair 1 blended, the rest / 8
    "llama3": ("llama", dict(SMALL_HEADS, max_position_embeddings=64, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)), ("safetensors", "gguf")),
    "linear": ("llama", dict(SMALL_HEADS, rope_scaling=dict(rope_type="linear", factor=2.5)),
               ("safetensors", "gguf")),
    # Qwen2.5's form; base 100 so that the ramp spans pairs 0..2
    "yarn": ("qwen2", dict(SMALL_HEADS, rope_theta=100.0, max_position_embeddings=64, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=16)), ("safetensors", "gguf")),
    # explicit magnitude and betas: the ramp spans pairs 0..5
    "yarn_explicit": ("qwen2", dict(SMALL_HEADS, rope_theta=100.0, max_position_embeddings=64, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.3,
        beta_fast=4.0, beta_slow=0.25)), ("safetensors", "gguf")),
    # DeepSeek's mscale / mscale_all_dim (llama.cpp's converter does not write these for qwen2)
    "yarn_mscale": ("qwen2", dict(SMALL_HEADS, rope_theta=100.0, max_position_embeddings=64, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=2.0,
        mscale_all_dim=1.0)), ("safetensors",)),
    # Mistral Nemo's shape: head_dim 16 with hidden 64 and 8 heads (not 64 / 8), sliding window 7
    "head_dim": ("mistral", dict(head_dim=16), ("safetensors", "gguf")),
}
PARAMS = [(name, fmt) for name, (_, _, fmts) in CASES.items() for fmt in fmts]


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """name -> (hf_model, {format: path}, reference logits of SEQ), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            arch, overrides, fmts = CASES[name]
            model = make_hf_model(arch, seed=5, **overrides)
            root = tmp_path_factory.mktemp(name)
            paths = {"safetensors": save_hf_folder(model, root / "hf")}
            if "gguf" in fmts:
                paths["gguf"] = write_gguf_with_rope(model, root / "model.gguf")
            built[name] = (model, paths, hf_logits(model, SEQ))
        return built[name]
    return get


def load(case_files, name, fmt):
    _, paths, ref = case_files(name)
    return Parameters.load(paths[fmt]), ref


# -- the run paths ---------------------------------------------------------------------------------

def prefill_logits(model):
    return model.prefill(InferenceState(model.config), SEQ, chunk_size=16, all_logits=True)


def reference_decode_logits(model):
    state = InferenceState(model.config)
    return np.stack([model.forward(state, t).copy() for t in SEQ])


def fast_decode_logits(model, prompt=8):
    """A prompt, then the compiled one-token steps (the fused blocks)."""
    state = InferenceState(model.config)
    head = model.prefill(state, SEQ[:prompt], all_logits=True)
    return np.concatenate([head, np.stack([model.fast_forward(state, t).copy() for t in SEQ[prompt:]])])


def batched_logits(model):
    """Three sequences at different positions decoded together, one span each per micro-batch
    (the batched compiled blocks): rows of SEQ's logits from each sequence's own positions."""
    from torchless.model.mistral import Span

    starts = [4, 13, 27]  # sequence i has SEQ[:starts[i]] prefilled, then steps teacher-forced
    states = [InferenceState(model.config) for _ in starts]
    for state, s in zip(states, starts):
        model.prefill(state, SEQ[:s])
    rows = {s: [] for s in starts}
    for step in range(len(SEQ) - max(starts)):
        out = model.forward_spans([Span(st, [SEQ[s + step]], st.pos) for st, s in zip(states, starts)])
        for s, row in zip(starts, out):
            rows[s].append(row)
    return {s: np.stack(r) for s, r in rows.items()}


def tensor_parallel_logits(params, world=2):
    from torchless.model.shards import ThreadedTensorParallel

    model = ThreadedTensorParallel.load(params, world)
    try:
        state = model.new_state(64)
        head = model.prefill(state, SEQ[:20], chunk_size=8, all_logits=True)
        return np.concatenate([head, np.stack([model.fast_forward(state, t).copy() for t in SEQ[20:]])])
    finally:
        model.close()


def pipeline_logits(params):
    """The last prompt token's logits, then one row per step, from a 2-stage pipeline."""
    from torchless.model.pipeline import PipelineParallelMistral

    pipe = PipelineParallelMistral(Mistral.load(params), 2)
    try:
        state = pipe.new_state(64)
        head = pipe.prefill(state, SEQ[:20], chunk_size=8).copy()
        return np.concatenate([head[None], np.stack([pipe.forward(state, t).copy() for t in SEQ[20:]])])
    finally:
        pipe.close()


@pytest.mark.parametrize("name, fmt", PARAMS)
@pytest.mark.parametrize("path", ["prefill", "decode", "fast_decode", "batched"])
def test_every_position_matches_transformers(case_files, name, fmt, path):
    params, ref = load(case_files, name, fmt)
    model = Mistral.load(params)
    if path == "batched":
        for start, rows in batched_logits(model).items():
            assert_close_rel(rows, ref[start:start + len(rows)])
        return
    ours = {"prefill": prefill_logits, "decode": reference_decode_logits, "fast_decode": fast_decode_logits}[path](model)
    assert_close_rel(ours, ref)


@pytest.mark.parametrize("name, fmt", [p for p in PARAMS if p[1] == "gguf"])
def test_tensor_parallel_and_pipeline_match_transformers(case_files, name, fmt):
    params, ref = load(case_files, name, fmt)
    assert_close_rel(tensor_parallel_logits(params), ref)
    assert_close_rel(pipeline_logits(params), ref[19:])


@pytest.mark.parametrize("name, fmt", [p for p in PARAMS if CASES[p[0]][1].get("rope_scaling")])
def test_the_scaling_decides_these_logits(case_files, name, fmt):
    """Without its scaling each model is far from transformers, so the tests above check it."""
    params, ref = load(case_files, name, fmt)
    assert params.config.rope_scaling != RopeScaling()
    params.config = dataclasses.replace(params.config, rope_scaling=RopeScaling())
    err = np.abs(prefill_logits(Mistral.load(params)) - ref).max() / np.abs(ref).max()
    assert err > 1e-2


def test_config_read_from_files(case_files):
    llama3 = load(case_files, "llama3", "gguf")[0].config.rope_scaling
    assert llama3.kind == "none" and len(llama3.freq_factors) == 8  # llama.cpp's rope_freqs
    assert load(case_files, "llama3", "safetensors")[0].config.rope_scaling.kind == "llama3"
    for fmt in ("safetensors", "gguf"):
        yarn = load(case_files, "yarn", fmt)[0].config.rope_scaling
        assert (yarn.kind, yarn.factor, yarn.original_context) == ("yarn", 4.0, 16)
        assert yarn.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
        assert load(case_files, "yarn_explicit", fmt)[0].config.rope_scaling.attention_factor == pytest.approx(1.3)
        cfg = load(case_files, "head_dim", fmt)[0].config
        assert (cfg.hidden_size, cfg.n_heads, cfg.head_dim) == (64, 8, 16)


# -- the frequencies themselves, against transformers' own functions -------------------------------

@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
         original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
    dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=16, beta_slow=2,
         mscale=0.707, mscale_all_dim=0.707),
    dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=2048, truncate=False,
         attention_factor=0.9),
    dict(rope_type="yarn", factor=8.0),  # no original context: max_position_embeddings
])
@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 1000000.0), (96, 10000.0)])
def test_frequencies_equal_transformers(rope, head_dim, theta):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = dict(model_type="llama", hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
              intermediate_size=8, num_hidden_layers=1, vocab_size=8, max_position_embeddings=131072,
              rope_theta=theta, rope_scaling=dict(rope))
    hf_config = transformers.LlamaConfig(**hf)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    ours = ModelConfig.from_hf(hf)
    np.testing.assert_allclose(ours.rope_inv_freq, inv_freq.double().numpy(), rtol=2e-6)
    assert ours.rope_attention_factor == pytest.approx(attention, rel=1e-9)


# -- what stays refused: one line naming it --------------------------------------------------------

HF_BASE = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=300, max_position_embeddings=128)


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling=dict(rope_type="longrope", factor=2.0)), "RoPE scaling type 'longrope' is not supported"),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "RoPE scaling type 'dynamic' is not supported"),
    (dict(rope_parameters=dict(rope_type="su", rope_theta=1e4)), "RoPE scaling type 'su' is not supported"),
    (dict(rope_scaling=dict(rope_type="linear")), "linear RoPE scaling is missing 'factor'"),
    (dict(rope_scaling=dict(rope_type="linear", factor=-2.0)), "factor must be positive"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "llama3 RoPE scaling is missing 'low_freq_factor'"),
    (dict(rope_scaling=dict(rope_type="yarn", factor="4")), "factor must be a number"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0), rope_theta=1.0), "needs rope_theta other than 1"),
    (dict(rope_scaling=dict(rope_type="linear", factor=1e-320)), "factor must be positive"),
    (dict(partial_rotary_factor=0.5), "partial RoPE"),
    (dict(rope_scaling=[1]), "RoPE scaling"),
])
def test_unsupported_or_bad_hf_rope_is_one_line(change, message):
    with pytest.raises(TorchlessError, match=message) as error:
        ModelConfig.from_hf(dict(HF_BASE, **change))
    assert "\n" not in str(error.value)


GGUF_BASE = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
             "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.context_length": 128,
             "llama.vocab_size": 300}


@pytest.mark.parametrize("change, rope_freqs, message", [
    ({"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}, None,
     "RoPE scaling type 'longrope' is not supported"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.yarn_ext_factor": 0.5}, None, "yarn_ext_factor 0.5 is not supported"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -1.0}, None, "factor must be positive"),
    ({"llama.rope.dimension_count": 8}, None, "partial RoPE"),
    ({"llama.attention.value_length": 8}, None, "value_length 8 different from attention.key_length 16"),
    ({}, np.ones(4, np.float32), "rope_freqs.weight must hold 8 positive finite factors"),
    ({}, np.array([1, 2, 3, 4, 5, 6, 7, np.nan], np.float32), "rope_freqs.weight must hold 8"),
])
def test_unsupported_or_bad_gguf_rope_is_one_line(change, rope_freqs, message):
    with pytest.raises(TorchlessError, match=message) as error:
        ModelConfig.from_gguf(dict(GGUF_BASE, **change), ["output.weight"], rope_freqs)
    assert "\n" not in str(error.value)


def test_gguf_scaling_as_llama_cpp_reads_it():
    def scaling(**keys):
        meta = dict(GGUF_BASE, **{f"llama.rope.scaling.{k}": v for k, v in keys.items()})
        return ModelConfig.from_gguf(meta, ["output.weight"]).rope_scaling

    assert scaling() == scaling(type="none", factor=4.0) == scaling(type="linear", factor=0.0) == RopeScaling()
    assert scaling(type="linear", factor=2.0) == RopeScaling("linear", 2.0)
    yarn = scaling(type="yarn", factor=4.0)  # the original context defaults to the context length
    assert (yarn.original_context, yarn.beta_fast, yarn.beta_slow) == (128, 32.0, 1.0)
    assert scaling(type="yarn", factor=4.0, attn_factor=2.0).attention_factor == pytest.approx(
        2 * yarn.attention_factor)
    with pytest.raises(UnsupportedModelError):
        scaling(type="dynamic", factor=2.0)
