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


@pytest.mark.parametrize("chunk, n", [(4, 22), (20, 22), (70, 88)])
def test_prefill_equals_forward(model, threads, chunk, n):
    """Chunks below gemm.MIN_TOKENS_FOR_BLAS rows run the quantized kernel, the 70-token one BLAS."""
    from torchless.kernels import gemm

    assert 20 < gemm.MIN_TOKENS_FOR_BLAS <= 70
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
