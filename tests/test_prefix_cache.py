"""The engine's prefix cache: a prompt that starts as an earlier one did runs only from where it
differs, and what follows agrees with a run without the cache (itself held to transformers
elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from torchless import Mistral, Parameters
from torchless.engine import Engine, Sequence
from torchless.engine import prefix_cache as pc
from torchless.engine.prefix_cache import BLOCK, PrefixCache
from torchless.kernels.pipeline import PipelineConfig
from torchless.model.kv_cache import KVCache
from torchless.model.pipeline import PipelineParallelMistral
from torchless.model.runner import LocalRunner
from torchless.model.shards import ThreadedTensorParallel

from model_factory import make_hf_model, write_gguf


def assert_close_rel(ours, ref, rel=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max relative error {err:.3g} > {rel}"


def run_in_turn(engine: Engine, prompts, max_tokens=4):
    """Each prompt through the engine after the one before has ended: per prompt, the logits
    each of its tokens was sampled from (greedy), and the tokens."""
    out = []
    for prompt in prompts:
        rows = []

        def greedy(logits, tokens, n_prompt):
            rows.append(np.array(logits, np.float32))
            return int(np.argmax(logits))

        seq = engine.add(Sequence(prompt, greedy, max_tokens))
        while engine.has_work():
            for event in engine.step():
                assert event.finish_reason != "error", event.error
        out.append((np.stack(rows), seq.tokens[len(prompt):]))
    return out


def shared_prefix_prompts(vocab: int, seed: int = 5):
    """Prompts that share starts of different lengths, and how many tokens each reuses."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, 37).tolist()
    first = shared + rng.integers(0, vocab, 3).tolist()          # 40 tokens: keeps 40
    second = shared + rng.integers(0, vocab, 5).tolist()         # shares 37: reuses 36
    third = first + rng.integers(0, vocab, 20).tolist()          # starts as the first: reuses 40
    fourth = list(third)                                         # the same again: all but the last
    other = rng.integers(0, vocab, 30).tolist()                  # nothing in common
    return [first, second, third, fourth, other], [0, 36, 40, 56, 0]


def assert_reuse_agrees(runner, alone_runner, vocab, prefix_cache_bytes=64 << 20):
    prompts, reused = shared_prefix_prompts(vocab)
    engine = Engine(runner, prefix_cache_bytes=prefix_cache_bytes)
    cached = run_in_turn(engine, prompts)
    fresh = run_in_turn(Engine(alone_runner, prefix_cache_bytes=0), prompts)
    for (logits, tokens), (ref_logits, ref_tokens) in zip(cached, fresh):
        assert_close_rel(logits, ref_logits)
        assert tokens == ref_tokens
    return engine, reused


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_prompt_runs_only_past_the_prefix_it_shares(tiny_models, arch):
    model = Mistral.load(Parameters.load(tiny_models[arch][2]))
    engine, reused = assert_reuse_agrees(LocalRunner(model), LocalRunner(model), model.config.vocab_size)
    assert engine.prefix_cache.reused_tokens == sum(reused)
    assert engine.prefix_cache.hits == sum(1 for n in reused if n)


def test_a_next_turn_reuses_the_completion_too(tiny_models):
    """A chat's next turn starts with the last turn's prompt and completion: both were kept
    when the sequence ended (all but the last completion token, which never ran)."""
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    rng = np.random.default_rng(7)
    first = rng.integers(0, model.config.vocab_size, 40).tolist()
    engine = Engine(LocalRunner(model), prefix_cache_bytes=64 << 20)
    (_, completion), = run_in_turn(engine, [first], max_tokens=9)
    assert len(completion) == 9
    turn = first + completion + rng.integers(0, model.config.vocab_size, 5).tolist()
    (logits, tokens), = run_in_turn(engine, [turn])
    (ref_logits, ref_tokens), = run_in_turn(Engine(LocalRunner(model), prefix_cache_bytes=0), [turn])
    assert_close_rel(logits, ref_logits)
    assert tokens == ref_tokens
    assert engine.prefix_cache.reused_tokens == 48  # 40 + 8 run, in whole blocks of 4


def test_a_sequence_that_failed_keeps_only_its_prompt(tiny_models):
    """A micro-batch that raised may have left its positions half written, but did not move
    the cache's position: only what ran before it is kept."""
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    real, calls = model.forward_spans, []

    def fails_on_the_third_step(spans, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(spans, *args, **kwargs)

    model.forward_spans = fails_on_the_third_step
    engine = Engine(LocalRunner(model), prefix_cache_bytes=64 << 20)
    seq = engine.add(Sequence(list(range(1, 39)), lambda logits, tokens, n: int(np.argmax(logits)), 8))
    while engine.has_work():
        engine.step()
    # positions 0-38 ran, 39 failed: 9 whole blocks, not the 10 that n_cached (40) would give
    assert seq.finish_reason == "error" and seq.n_cached == 40
    assert engine.prefix_cache.lookup(seq.tokens + [1], 64)[1] == 36


def test_the_prefix_is_reused_through_every_runner_in_this_process(tiny_models):
    params = Parameters.load(tiny_models["llama"][2])
    model = Mistral.load(params)
    _, reused = shared_prefix_prompts(model.config.vocab_size)
    for runner in (ThreadedTensorParallel.load(params, 2),
                   PipelineParallelMistral(model, 2, PipelineConfig(num_micro_batches=2, async_execution=True))):
        try:
            engine, _ = assert_reuse_agrees(runner, LocalRunner(model), model.config.vocab_size)
            assert engine.prefix_cache.reused_tokens == sum(reused)
        finally:
            runner.close()


def test_a_sliding_window_keeps_only_prompts_it_still_holds(tiny_models):
    """mistral's window is 7 tokens: every test prompt has wrapped its ring, so none is kept."""
    model = Mistral.load(Parameters.load(tiny_models["mistral"][2]))
    engine, _ = assert_reuse_agrees(LocalRunner(model), LocalRunner(model), model.config.vocab_size)
    assert engine.prefix_cache.hits == 0 and engine.prefix_cache.nbytes == 0


def test_gemma3_local_and_global_layers_reuse_their_prefix(tmp_path):
    """Gemma 3 keeps its local layers in rings of their own (48 positions here) where a
    sequence is longer than that: a prefix kept from a cache without a ring is restored into
    one with, and a prompt that wrapped the ring is not kept."""
    model = Mistral.load(Parameters.load(write_gguf(make_hf_model("gemma3", seed=3, sliding_window=48),
                                                    tmp_path / "gemma3.gguf")))
    engine, reused = assert_reuse_agrees(LocalRunner(model), LocalRunner(model), model.config.vocab_size)
    # the third prompt (60 tokens) wrapped its ring and was not kept: the fourth reuses the first
    assert engine.prefix_cache.reused_tokens == 36 + 40 + 40


def test_a_prefix_that_cannot_be_restored_runs_in_full(tiny_models, monkeypatch):
    """Out of memory half way through a restore: the prompt runs whole, over what was written."""
    model = Mistral.load(Parameters.load(tiny_models["llama"][2]))
    real = KVCache.load_prefix

    def fails_half_way(self, arrays, n):
        real(self, arrays, n // 2)
        raise MemoryError

    monkeypatch.setattr(KVCache, "load_prefix", fails_half_way)
    engine, _ = assert_reuse_agrees(LocalRunner(model), LocalRunner(model), model.config.vocab_size)
    assert engine.prefix_cache.hits == 0 and engine.prefix_cache.nbytes > 0


def test_an_mpi_runner_has_no_prefix_cache():
    from torchless.model.runner import Runner

    assert Runner().caches(object()) == []


# -- the cache itself ----------------------------------------------------------------------------

def filled_cache(n: int, seed: int) -> KVCache:
    cache = KVCache(n_layers=2, n_kv_heads=1, head_dim=4, max_seq_len=64)
    rng = np.random.default_rng(seed)
    for layer in range(2):
        cache.write(layer, np.arange(n), rng.normal(size=(n, 1, 4)).astype(np.float32),
                    rng.normal(size=(n, 1, 4)).astype(np.float32))
    cache.advance(n)
    return cache


def test_a_restored_prefix_is_the_kept_keys_and_values():
    cache = filled_cache(20, seed=1)
    kept = PrefixCache(1 << 20)
    prompt = list(range(20))
    kept.store(prompt, [cache], cache.intact_prefix())
    snapshot, n = kept.lookup(prompt + [99], room=64)
    assert n == 20 and kept.queried_tokens == 21
    new = KVCache(n_layers=2, n_kv_heads=1, head_dim=4, max_seq_len=64)
    kept.restore(snapshot, n, [new])
    assert new.pos == 20 and kept.reused_tokens == 20
    for layer in range(2):
        assert np.array_equal(new.layer(layer)[0][:20], cache.layer(layer)[0][:20])
        assert np.array_equal(new.layer(layer)[1][:20], cache.layer(layer)[1][:20])
    with pytest.raises(ValueError, match="does not fit"):
        new.load_prefix(snapshot.arrays[0], n)  # not an empty cache any more
    # a prompt that is only the kept prefix still runs its last token; a short room cuts it
    assert kept.lookup(prompt, room=64)[1] == 20 - BLOCK
    assert kept.lookup(prompt + [99], room=10)[1] == 8


def test_the_budget_drops_the_least_recently_used_prefix():
    a, b = list(range(100, 120)), list(range(200, 220))
    kept = PrefixCache(0)
    kept.store(a, [filled_cache(20, 1)], 20)
    assert kept.nbytes == 0  # over a budget of 0: nothing kept
    one = 2 * 2 * 20 * 4 * 4  # K and V, 2 layers, 20 positions, 4 floats
    kept = PrefixCache(one)
    kept.store(a, [filled_cache(20, 1)], 20)
    kept.store(b, [filled_cache(20, 2)], 20)
    assert kept.nbytes == one
    assert kept.lookup(a + [1], 64) is None and kept.lookup(b + [1], 64)[1] == 20


def test_a_longer_prompt_replaces_the_snapshot_it_covers():
    kept = PrefixCache(1 << 20)
    short, long = list(range(12)), list(range(24))
    kept.store(short, [filled_cache(12, 1)], 12)
    kept.store(long, [filled_cache(24, 2)], 24)
    assert kept.nbytes == 2 * 2 * 24 * 4 * 4  # the 12-token one went: its keys lead to the new one
    kept.store(short, [filled_cache(12, 3)], 12)
    assert kept.nbytes == 2 * 2 * 24 * 4 * 4  # covered by the kept one: not stored again


def test_a_hash_collision_is_never_a_hit(monkeypatch):
    kept = PrefixCache(1 << 20)
    kept.store(list(range(8)), [filled_cache(8, 1)], 8)
    monkeypatch.setattr(pc, "block_keys", lambda tokens: [hash((0, tuple(range(4))))] * (len(tokens) // BLOCK))
    assert kept.lookup(list(range(50, 60)), 64) is None
