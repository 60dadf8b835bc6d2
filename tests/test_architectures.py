"""Qwen3 and Gemma 3 (text) against transformers (CPU torch), from safetensors and from GGUF as
llama.cpp's converter writes them.

Qwen3: per-head RMSNorm on q and k before RoPE, an explicit head_dim (q wider than the hidden
state), and in one case sliding-window layers from max_window_layers on. Gemma 3: GeGLU, embeddings
times sqrt(hidden), (1 + w) norms (folded into the GGUF by the converter), sandwich norms, q/k
norms, local sliding-window layers with their own RoPE base between global layers (whose RoPE may
be scaled), the query scale of query_pre_attn_scalar, final logit softcapping, tied embeddings.
The sequence (24 tokens) is longer than the windows (4), so every run path (prefill in chunks,
the reference and the compiled decode steps, a micro-batch of sequences, tensor-parallel shards,
a pipeline) is held to transformers at every position, local layers through rings of their window.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from model_factory import hf_logits, make_hf_model, save_hf_folder, write_gguf_with_rope
from torchless import InferenceState, Mistral, Parameters, UnsupportedModelError
from torchless.config import RopeScaling
from torchless.model.mistral import Span

SEQ = [int(t) for t in np.random.default_rng(21).integers(0, 300, 24)]
LINEAR = dict(rope_type="linear", factor=2.0)

# name -> (architecture, transformers config overrides, formats)
CASES = {
    "qwen3": ("qwen3", {}, ("safetensors", "gguf")),
    # layer 0 full, layer 1 windowed (transformers' max_window_layers; llama.cpp has no such key)
    "qwen3_sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
                      ("safetensors",)),
    "gemma3": ("gemma3", {}, ("safetensors", "gguf")),
    # global layers' RoPE scaled (local ones not), logits softcapped
    "gemma3_scaled": ("gemma3", dict(rope_scaling=LINEAR, final_logit_softcapping=3.0), ("safetensors", "gguf")),
    # what GGUF cannot say: local and global layers alternating (layer_types), local base 100, a
    # query scale of 1/sqrt(32) with head_dim 16
    "gemma3_layer_types": ("gemma3", dict(num_hidden_layers=4, sliding_window_pattern=2,
                                          rope_local_base_freq=100.0, query_pre_attn_scalar=32), ("safetensors",)),
}
PARAMS = [(name, fmt) for name, (_, _, fmts) in CASES.items() for fmt in fmts]


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def rel_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """name -> (hf_model, {format: path}, reference logits of SEQ), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            arch, overrides, fmts = CASES[name]
            model = make_hf_model(arch, seed=7, **overrides)
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
    return model.prefill(InferenceState(model.config), SEQ, chunk_size=7, all_logits=True)


def reference_decode_logits(model):
    state = InferenceState(model.config)
    return np.stack([model.forward(state, t).copy() for t in SEQ])


def fast_decode_logits(model, prompt=6):
    state = InferenceState(model.config)
    head = model.prefill(state, SEQ[:prompt], all_logits=True)
    return np.concatenate([head, np.stack([model.fast_forward(state, t).copy() for t in SEQ[prompt:]])])


def batched_logits(model, fast=False, contexts=(None, None, None)):
    """Three sequences at different positions decoded together, one span each per micro-batch
    (fast: the engine's way, through the compiled blocks where the model's blocks have them),
    their caches sized for `contexts` tokens (None: the model's context)."""
    starts = [3, 9, 14]
    states = [InferenceState(model.config, n) for n in contexts]
    for state, s in zip(states, starts):
        model.prefill(state, SEQ[:s])
    rows = {s: [] for s in starts}
    for step in range(len(SEQ) - max(starts)):
        out = model.forward_spans([Span(st, [SEQ[s + step]], st.pos) for st, s in zip(states, starts)], fast=fast)
        for s, row in zip(starts, out):
            rows[s].append(row)
    return {s: np.stack(r) for s, r in rows.items()}


def tensor_parallel_logits(params, world=2):
    from torchless.model.shards import ThreadedTensorParallel

    model = ThreadedTensorParallel.load(params, world)
    try:
        state = model.new_state(64)
        head = model.prefill(state, SEQ[:12], chunk_size=5, all_logits=True)
        return np.concatenate([head, np.stack([model.fast_forward(state, t).copy() for t in SEQ[12:]])])
    finally:
        model.close()


def pipeline_logits(params):
    """The last prompt token's logits, then one row per step, from a 2-stage pipeline."""
    from torchless.model.pipeline import PipelineParallelMistral

    pipe = PipelineParallelMistral(Mistral.load(params), 2)
    try:
        state = pipe.new_state(64)
        head = pipe.prefill(state, SEQ[:12], chunk_size=5).copy()
        return np.concatenate([head[None], np.stack([pipe.forward(state, t).copy() for t in SEQ[12:]])])
    finally:
        pipe.close()


def assert_every_position_close(model, ref, path):
    """The logits of SEQ through one run path ("prefill", "decode", "fast_decode", "batched",
    "fast_batched") within 1e-4 of `ref` at every position."""
    if path in ("batched", "fast_batched"):
        for start, rows in batched_logits(model, fast=path == "fast_batched").items():
            assert_close_rel(rows, ref[start:start + len(rows)])
        return
    ours = {"prefill": prefill_logits, "decode": reference_decode_logits, "fast_decode": fast_decode_logits}[path](model)
    assert_close_rel(ours, ref)


@pytest.mark.parametrize("name, fmt", PARAMS)
@pytest.mark.parametrize("path", ["prefill", "decode", "fast_decode", "batched", "fast_batched"])
def test_every_position_matches_transformers(case_files, name, fmt, path):
    params, ref = load(case_files, name, fmt)
    assert_every_position_close(Mistral.load(params), ref, path)


@pytest.mark.parametrize("name, fmt", [p for p in PARAMS if p[0] != "gemma3_scaled"])
def test_tensor_parallel_and_pipeline_match_transformers(case_files, name, fmt):
    params, ref = load(case_files, name, fmt)
    assert_close_rel(tensor_parallel_logits(params), ref)
    assert_close_rel(pipeline_logits(params), ref[11:])


# -- each feature decides these logits: without it they are far from transformers -----------------

BREAKS = [
    ("qwen3", "safetensors", dict(qk_norm=False)),
    ("qwen3_sliding", "safetensors", dict(sliding_window=None, sliding_layers=None)),
    ("qwen3_sliding", "safetensors", dict(sliding_layers=None)),  # every layer windowed
    ("gemma3", "gguf", dict(qk_norm=False)),
    ("gemma3", "gguf", dict(post_norms=False)),
    ("gemma3", "gguf", dict(activation="silu")),
    ("gemma3", "gguf", dict(embedding_scale=1.0)),
    ("gemma3", "safetensors", dict(norm_offset=0.0)),
    ("gemma3", "gguf", dict(sliding_window=None, sliding_layers=None, rope_local_theta=None)),
    ("gemma3", "gguf", dict(sliding_layers=None)),  # every layer local
    ("gemma3", "gguf", dict(rope_local_theta=None)),  # local layers with the global base
    ("gemma3_scaled", "gguf", dict(final_logit_softcap=None)),
    ("gemma3_scaled", "gguf", dict(rope_scaling=RopeScaling())),  # global layers unscaled
    ("gemma3_layer_types", "safetensors", dict(attention_scale=None)),
]


@pytest.mark.parametrize("name, fmt, broken", BREAKS, ids=[f"{n}-{f}-{'+'.join(b)}" for n, f, b in BREAKS])
def test_each_feature_decides_these_logits(case_files, name, fmt, broken):
    params, ref = load(case_files, name, fmt)
    params.config = dataclasses.replace(params.config, **broken)
    assert rel_error(prefill_logits(Mistral.load(params)), ref) > 1e-2


# -- what the files say ----------------------------------------------------------------------------

def test_config_read_from_files(case_files):
    for fmt in ("safetensors", "gguf"):
        q = load(case_files, "qwen3", fmt)[0].config
        assert (q.architecture, q.qk_norm, q.head_dim, q.n_heads, q.rope_interleaved) == ("qwen3", True, 16, 8, False)
        g = load(case_files, "gemma3", fmt)[0].config
        assert (g.architecture, g.sliding_window, g.sliding_layers) == ("gemma3", 4, (True,) * 5 + (False,))
        assert (g.rope_theta, g.rope_local_theta, g.activation, g.embedding_scale) == (1000.0, 10000.0, "gelu_tanh", 8.0)
        assert g.qk_norm and g.post_norms and g.tie_embeddings and not g.rope_interleaved
        assert g.norm_offset == (1.0 if fmt == "safetensors" else 0.0)  # the converter adds 1
        assert g.kv_window is None and g.layer_window(5) is None and g.layer_window(0) == 4
        s = load(case_files, "gemma3_scaled", fmt)[0].config
        assert (s.rope_scaling.kind, s.rope_scaling.factor, s.final_logit_softcap) == ("linear", 2.0, 3.0)
    t = load(case_files, "gemma3_layer_types", "safetensors")[0].config
    assert (t.sliding_layers, t.rope_local_theta, t.attention_scale) == ((True, False) * 2, 100.0, 32 ** -0.5)
    assert load(case_files, "qwen3_sliding", "safetensors")[0].config.sliding_layers == (False, True)


def test_local_layers_keep_rings_of_their_window(case_files):
    """Gemma 3's 5 local layers keep the last 4 positions each, its global layer all 24."""
    from torchless.model.kv_cache import KVCache

    model = Mistral.load(load(case_files, "gemma3", "gguf")[0])
    state = InferenceState(model.config)
    model.prefill(state, SEQ)
    assert state.cache.k.shape[0] == 1 and state.cache.k.shape[1] >= 24 and state.cache.k_local.shape[:2] == (5, 4)
    per_position = 2 * 4 * model.config.n_kv_heads * model.config.head_dim
    assert KVCache.bytes_for(model.config, model.config.n_kv_heads, 24) == per_position * (24 + 5 * 4)


def test_qwen3_and_gemma3_run_as_compiled_blocks(case_files):
    """Qwen3's blocks (Llama's with per-head q/k norms) and Gemma 3's (q/k norms, post-norms,
    GeGLU, local layers) run as the compiled blocks."""
    for name in ("qwen3", "gemma3"):
        blocks = Mistral.load(load(case_files, name, "gguf")[0]).fused_blocks()
        assert all(a is not None and m is not None for a, m in blocks), name


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_a_micro_batch_of_decode_steps_and_prompt_chunks_matches_transformers(case_files, name, monkeypatch):
    """A new request's prompt chunk in the same micro-batch as others' decode steps (what a
    server's batch holds whenever a request arrives) runs as the compiled blocks while the chunk
    fits every ring of its cache: all its rows' keys are written, then each row attends up to
    its own position. Gemma 3's local rings hold 4 positions, so its chunk that ends past them
    runs kernel by kernel, which must agree as well, as does a prompt alone. Every row is held
    to transformers."""
    from torchless.kernels import fused_layer

    params, ref = load(case_files, name, "gguf")
    model = Mistral.load(params)
    blocks = []
    run_counted = fused_layer.run_counted
    monkeypatch.setattr(fused_layer, "run_counted", lambda block, *a: (blocks.append(block), run_counted(block, *a)))
    decoding, fresh = InferenceState(model.config), InferenceState(model.config)
    model.prefill(decoding, SEQ[:9])
    expect_fused = {"qwen3": [True, True], "gemma3": [True, False]}[name]
    for step, (chunk, fused) in enumerate(zip([(0, 3), (3, 8)], expect_fused)):
        blocks.clear()
        spans = [Span(decoding, [SEQ[9 + step]], 9 + step), Span(fresh, SEQ[chunk[0]:chunk[1]], chunk[0])]
        out = model.forward_spans(spans, all_logits=True, fast=True)
        assert (fused_layer.batch_attention_block in blocks) == fused, (name, step)
        assert_close_rel(out[0], ref[9 + step])
        assert_close_rel(out[1:], ref[chunk[0]:chunk[1]])
    blocks.clear()  # a prompt alone keeps the kernels (a one-sequence process loads no blocks)
    model.forward_spans([Span(InferenceState(model.config), SEQ[:3], 0)], fast=True)
    assert fused_layer.batch_attention_block not in blocks


def test_a_multimodal_gemma3_folder_runs_its_text_model(case_files, tmp_path):
    """Gemma3ForConditionalGeneration's config.json (the text model in text_config) and tensor
    names (model.language_model.*, a vision tower left aside) give the text model's logits."""
    from safetensors.numpy import load_file, save_file

    _, paths, ref = case_files("gemma3")
    folder = paths["safetensors"]
    text = json.loads((folder / "config.json").read_text())
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": dict(text, model_type="gemma3_text"), "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {name.replace("model.", "model.language_model.", 1): t
               for name, t in load_file(str(folder / "model.safetensors")).items()}
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_close_rel(prefill_logits(Mistral.load(Parameters.load(tmp_path))), ref)


@pytest.mark.parametrize("overrides, message", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "hidden activation 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "on sliding-window layers is not supported"),
])
def test_what_gemma3_cannot_run_is_refused_in_one_line(overrides, message):
    from torchless import ModelConfig

    base = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                vocab_size=300)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(dict(base, **overrides))


def test_compiled_qk_norm_and_query_scale_match_the_reference():
    """The compiled blocks' per-head q/k norms and query scale (fused.qk_norm_and_scale, in
    place) against the NumPy reference path's (ops.rmsnorm per head, then the scale)."""
    from torchless.kernels import fused, ops

    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    q_norm, k_norm = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.uniform(0.5, 1.5, 16).astype(np.float32)
    expected_q = ops.rmsnorm(q, q_norm, 1e-6) * np.float32(0.3)
    expected_k = ops.rmsnorm(k, k_norm, 1e-6)
    fused.qk_norm_and_scale(q, k, q_norm, k_norm, 1e-6, 0.3)
    np.testing.assert_allclose(q, expected_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k, expected_k, rtol=1e-6, atol=1e-6)
    before = q.copy()
    fused.qk_norm_and_scale(q, k, np.zeros(0, np.float32), np.zeros(0, np.float32), 1e-6, 1.0)
    np.testing.assert_array_equal(q, before)  # no norms and a factor of 1: nothing done


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_compiled_blocks_as_parallel_phases_match_transformers(case_files, name, monkeypatch):
    """At 2 threads with the inline threshold at 0, a decode step's layer runs as one parallel
    region (kernels/phases.py) and a micro-batch's products as the scheduler's tasks: q/k
    norms, post-norms and GeGLU there too, against transformers."""
    import numba

    from torchless.kernels import adaptive

    params, ref = load(case_files, name, "gguf")
    previous = numba.get_num_threads()
    numba.set_num_threads(2)
    monkeypatch.setattr(adaptive, "_inline_bytes", 0)
    try:
        model = Mistral.load(params)
        assert_every_position_close(model, ref, "fast_decode")
        assert_every_position_close(model, ref, "fast_batched")
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_batched_sequences_with_caches_of_other_sizes(case_files, name):
    """Sequences sized for different contexts (the engine sizes each for its prompt and
    max_tokens) decoded together: rings of different lengths; and (gemma3, a 4-token window) a
    sequence whose context fits the window, so that its windowed layers stay whole."""
    params, ref = load(case_files, name, "gguf")
    model = Mistral.load(params)
    for start, rows in batched_logits(model, fast=True, contexts=(13, 64, 30)).items():
        assert_close_rel(rows, ref[start:start + len(rows)])
    short, long = InferenceState(model.config, 4), InferenceState(model.config, 64)
    model.prefill(short, SEQ[:2])
    model.prefill(long, SEQ[:9])
    for step in range(2):
        out = model.forward_spans([Span(short, [SEQ[2 + step]], 2 + step), Span(long, [SEQ[9 + step]], 9 + step)],
                                  fast=True)
        assert_close_rel(out[0], ref[2 + step])
        assert_close_rel(out[1], ref[9 + step])
