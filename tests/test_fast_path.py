"""The fast path (quantized kernels, scheduler, BLAS prefill) against the reference forward,
on every quantization type the engine loads. The reference itself is held to transformers and
gguf-py elsewhere; here the property is fast == reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from model_factory import write_random_gguf
from torchless import InferenceState, Mistral, Parameters
from torchless.kernels import adaptive

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
TOKENS = [3, 17, 250, 9, 301, 44, 44, 0, 128, 77, 5, 6, 300, 2, 99, 150, 12, 13, 14, 200, 31, 8]


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


@pytest.fixture(scope="module", params=TYPES)
def model(request, tmp_path_factory):
    path = write_random_gguf(tmp_path_factory.mktemp(request.param) / "m.gguf", request.param,
                             sliding_window=9)
    return Mistral.load(Parameters.load(path))


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    previous = numba.get_num_threads()
    numba.set_num_threads(request.param)
    monkeypatch.setattr(adaptive, "_inline_bytes", 0)  # tasks even for these small matrices
    yield request.param
    numba.set_num_threads(previous)


def reference_logits(model, tokens):
    state = InferenceState(model.config)
    out = []
    for t in tokens:
        out.append(model.forward(state, t).copy())
    return np.stack(out)


def test_fast_forward_equals_forward(model, threads):
    ref = reference_logits(model, TOKENS)
    state = InferenceState(model.config)
    fast = np.stack([model.fast_forward(state, t).copy() for t in TOKENS])
    assert_close_rel(fast, ref)


@pytest.mark.parametrize("chunk, n", [(3, 22), (4, 22), (20, 22), (70, 88)])
def test_prefill_equals_forward(model, threads, chunk, n, monkeypatch):
    """Chunks of 3 and 4 run the direct batched kernels, of 20 the expanded float tiles, the
    70-token one BLAS (its threshold lowered here: by default it starts past the default chunk of 256)."""
    from torchless.kernels import gemm

    monkeypatch.setattr(gemm, "MIN_TOKENS_FOR_BLAS", 64)
    tokens = (TOKENS * 4)[:n]
    ref = reference_logits(model, tokens)
    state = InferenceState(model.config)
    assert_close_rel(model.prefill(state, tokens, chunk_size=chunk, all_logits=True), ref)


def test_prefill_then_decode_share_the_cache(model):
    ref = reference_logits(model, TOKENS)
    state = InferenceState(model.config)
    model.prefill(state, TOKENS[:15])
    rest = np.stack([model.fast_forward(state, t).copy() for t in TOKENS[15:]])
    assert_close_rel(rest, ref[15:])


def test_decode_allocates_nothing_per_token(model):
    import tracemalloc

    state = InferenceState(model.config)
    for t in TOKENS[:3]:
        model.fast_forward(state, t)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for t in TOKENS[3:8]:
        model.fast_forward(state, t)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename")
                if s.size_diff > 0)
    tracemalloc.stop()
    assert grown < 4096, f"decode allocated {grown} bytes over 5 tokens"


# -- the compiled blocks (kernels/fused_layer.py) against the kernel-by-kernel path --------------

def unfused(model):
    """The same model with every block run kernel by kernel (what the fused blocks replace)."""
    unfused_blocks = [(None, None)] * len(model.layers)
    model.fused_blocks = lambda work=None: unfused_blocks
    return model


def decode_logits(model, tokens):
    state = InferenceState(model.config)
    return np.stack([model.fast_forward(state, t).copy() for t in tokens])


def batched_logits(model, prompts, n_steps):
    """Each prompt prefilled but its last token, then n_steps micro-batches of one-token spans,
    one span per prompt; greedy from the reference's logits so both paths see the same tokens."""
    from torchless.model.mistral import Span

    states = [InferenceState(model.config) for _ in prompts]
    for state, prompt in zip(states, prompts):
        if len(prompt) > 1:
            model.prefill(state, prompt[:-1])
    tokens, out = [p[-1] for p in prompts], []
    for _ in range(n_steps):
        out.append(model.forward_spans([Span(s, [t], s.pos) for s, t in zip(states, tokens)]))
        tokens = [int(t) % model.config.vocab_size for t in out[-1].argmax(axis=1)]
    return np.stack(out)


@pytest.fixture(params=["mistral", "llama", "qwen2"])
def hf_arch_model(request, tiny_models):
    """Sliding window (mistral), plain (llama), Q/K/V bias and rotate-half RoPE (qwen2)."""
    return Mistral.load(Parameters.load(tiny_models[request.param][2]))


@pytest.fixture
def mixed_model(tmp_path_factory):
    """Layers whose matrices mix "q4", "q8" and "f32" packings, as Q4_K_M files mix them."""
    kinds = {}
    for qtype in ("Q4_K", "Q6_K", "Q8_0", "F16"):
        path = write_random_gguf(tmp_path_factory.mktemp(qtype) / "m.gguf", qtype, sliding_window=9)
        kinds[qtype] = Mistral.load(Parameters.load(path))
    model = kinds["Q4_K"]
    model.layers[0].attn_v = kinds["Q6_K"].layers[0].attn_v
    model.layers[0].ffn_down = kinds["Q8_0"].layers[0].ffn_down
    model.layers[1].attn_q = kinds["F16"].layers[1].attn_q
    model.layers[1].ffn_up = kinds["Q6_K"].layers[1].ffn_up
    assert {m.packed.kind for m in model.linears()} == {"q4", "q8", "f32"}
    return model


PROMPTS = [TOKENS[:3], TOKENS[3:15], TOKENS[15:16], TOKENS[5:19]]


def test_fused_decode_equals_unfused_on_each_architecture(hf_arch_model, threads):
    tokens = [t % hf_arch_model.config.vocab_size for t in TOKENS]
    fused = decode_logits(hf_arch_model, tokens)
    assert_close_rel(fused, reference_logits(hf_arch_model, tokens))
    assert_close_rel(fused, decode_logits(unfused(hf_arch_model), tokens), rel=1e-5)


def test_fused_micro_batch_equals_unfused_on_each_architecture(hf_arch_model, threads):
    prompts = [[t % hf_arch_model.config.vocab_size for t in p] for p in PROMPTS]
    fused = batched_logits(hf_arch_model, prompts, 6)
    assert_close_rel(fused, batched_logits(unfused(hf_arch_model), prompts, 6), rel=1e-5)


def test_fused_paths_on_mixed_layers(mixed_model, threads):
    ref = reference_logits(mixed_model, TOKENS)
    assert_close_rel(decode_logits(mixed_model, TOKENS), ref)
    assert_close_rel(batched_logits(mixed_model, PROMPTS, 4),
                     batched_logits(unfused(mixed_model), PROMPTS, 4))


def test_fused_decode_counts_the_tasks_its_plans_made(model, threads):
    """A layer's parallel region runs the tasks of its products' plans (gate and up together,
    on their one plan) and of the attention plan over heads, the LM head those of its plan:
    the stats move by exactly that."""
    from torchless.kernels.workdist import WorkDistributionConfig

    state, c = InferenceState(model.config), model.config
    for token in TOKENS[:6]:
        n_valid = state.cache.n_valid(state.pos)
        expected = 0
        if threads > 1:
            heads = WorkDistributionConfig.for_attention(c.n_heads, n_valid).chunk_bounds(c.n_heads)
            for attention, mlp in model.fused_blocks(model.work):
                products = [*attention, mlp[0], mlp[2]]  # mlp[1], up, shares gate's plan
                expected += sum(len(weight[6]) - 1 for weight in products) + len(heads) - 1
            lm_head = model.output.packed
            expected += adaptive._matmul_plan(lm_head.rows, lm_head.cols, model.work, threads).n_tasks
        adaptive.GLOBAL_STATS.reset()
        model.fast_forward(state, token)
        assert adaptive.GLOBAL_STATS.tasks_created == expected
        assert adaptive.GLOBAL_STATS.local_tasks + adaptive.GLOBAL_STATS.stolen_tasks == expected


@pytest.mark.parametrize("path", ["forward", "fast_forward"])
def test_debug_names_the_first_block_whose_activations_are_not_finite(tiny_models, path):
    from torchless import Mistral, Parameters, TorchlessError

    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    model.layers[1].ffn_norm = np.full_like(model.layers[1].ffn_norm, np.inf)
    step = getattr(model, path)
    with np.errstate(all="ignore"):  # without debug: silent garbage
        assert not np.isfinite(step(model.new_state(8), 3)).all()
    where = "layer 1" if path == "forward" else "layer 1 MLP"
    with pytest.raises(TorchlessError, match=f"non-finite activation.* after {where}$"):
        with np.errstate(all="ignore"):
            step(model.new_state(8), 3, debug=True)
