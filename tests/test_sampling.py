"""SamplingParams validation, the Sampler's distributions, StopStrings, and the generation loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchless.errors import ContextOverflowError, TorchlessError
from torchless.generate import generate_tokens
from torchless.sampling import Sampler, SamplingParams, StopStrings, sample


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), "finite"),
    ("top_p", 0.0, "in (0, 1]"),
    ("top_p", 1.5, "in (0, 1]"),
    ("top_p", float("nan"), "in (0, 1]"),
    ("top_k", -1, ">= 0"),
    ("top_k", 2.5, "integer"),
    ("min_p", -0.01, "in [0, 1]"),
    ("min_p", 1.01, "in [0, 1]"),
    ("min_p", float("nan"), "in [0, 1]"),
    ("repeat_penalty", 0.0, "> 0"),
    ("repeat_penalty", -1.0, "> 0"),
    ("repeat_penalty", float("nan"), "> 0"),
    ("repeat_last_n", -2, ">= -1"),
    ("seed", -1, ">= 0"),
    ("temperature", "hot", "number"),
    ("presence_penalty", 2.5, "in [-2, 2]"),
    ("frequency_penalty", -3, "in [-2, 2]"),
    ("logit_bias", {"x": 1}, "token ids"),
    ("logit_bias", {-1: 1}, "token ids"),
    ("logit_bias", {5: 101}, "[-100, 100]"),
    ("logit_bias", [3], "map token ids"),
])
def test_invalid_values_name_the_parameter_and_range(field, value, words):
    with pytest.raises(TorchlessError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field) and words in message, message


def test_edge_values_are_valid():
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1e-3, repeat_last_n=-1, seed=0)
    SamplingParams(min_p=1.0, top_p=1e-9)


# -- the sampler -------------------------------------------------------------------------------

def _logits(seed=0, vocab=500):
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = _logits(seed)
    assert Sampler(SamplingParams(temperature=0))(logits, [1, 2, 3]) == int(np.argmax(logits))


def test_top_k_1_is_greedy_at_any_temperature():
    for seed in range(5):
        logits = _logits(seed)
        s = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=seed))
        assert all(s(logits) == int(np.argmax(logits)) for _ in range(20))


def test_seeded_draws_are_reproducible_and_seeds_differ():
    logits = _logits(1)
    params = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    a = [Sampler(SamplingParams(**params, seed=7))(logits) for _ in range(1)]
    s1, s2, s3 = (Sampler(SamplingParams(**params, seed=s)) for s in (7, 7, 8))
    run1, run2, run3 = ([s(logits) for _ in range(50)] for s in (s1, s2, s3))
    assert run1 == run2 and run1[0] == a[0]
    assert run1 != run3


def test_caller_logits_are_not_modified():
    logits = _logits(2)
    before = logits.copy()
    Sampler(SamplingParams(repeat_penalty=1.5, seed=0))(logits, list(range(100)))
    np.testing.assert_array_equal(logits, before)


# A known distribution over 8 tokens, shuffled so that ids and ranks differ.
PROBS = np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02])
ORDER = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # token ORDER[i] has probability PROBS[i]


def _known_logits():
    logits = np.empty(8, np.float32)
    logits[ORDER] = np.log(PROBS)
    return logits


def _frequencies(params: SamplingParams, n: int = 20000) -> np.ndarray:
    s = Sampler(params)
    logits = _known_logits()
    return np.bincount([s(logits) for _ in range(n)], minlength=8) / n


def _expected(keep_ranks: int) -> np.ndarray:
    out = np.zeros(8)
    out[ORDER[:keep_ranks]] = PROBS[:keep_ranks] / PROBS[:keep_ranks].sum()
    return out


@pytest.mark.parametrize("params, keep", [
    (dict(top_k=0, top_p=1.0, min_p=0.0), 8),      # the distribution itself
    (dict(top_k=3, top_p=1.0, min_p=0.0), 3),
    (dict(top_k=0, top_p=0.67, min_p=0.0), 3),     # 0.30 + 0.22 = 0.52 < 0.67 <= 0.67
    (dict(top_k=0, top_p=0.68, min_p=0.0), 4),
    (dict(top_k=0, top_p=1.0, min_p=0.35), 4),     # p >= 0.35 * 0.30 = 0.105
    (dict(top_k=0, top_p=1.0, min_p=0.45), 3),     # p >= 0.135 keeps 0.30, 0.22, 0.15
])
def test_support_and_frequencies_follow_the_renormalised_distribution(params, keep):
    freq = _frequencies(SamplingParams(temperature=1.0, seed=3, **params))
    expected = _expected(keep)
    assert set(np.flatnonzero(freq)) <= set(ORDER[:keep])
    # 20000 draws: binomial std <= 0.0036, so 0.015 is over 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_temperature_sharpens_before_top_p():
    # At temperature 0.5 the probabilities are p^2 renormalised; top_p then acts on those.
    sq = PROBS ** 2 / (PROBS ** 2).sum()
    keep = int(np.searchsorted(np.cumsum(sq), 0.8)) + 1
    freq = _frequencies(SamplingParams(temperature=0.5, top_k=0, top_p=0.8, min_p=0.0, seed=4))
    expected = np.zeros(8)
    expected[ORDER[:keep]] = sq[:keep] / sq[:keep].sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_repetition_penalty_follows_llama_cpp():
    logits = np.array([2.0, -2.0, 1.0, 0.5, -0.5], np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=3))
    penalized = s._penalized(logits, [0, 0, 4, 1, 1])  # last 3: {4, 1}; token 0 is too old
    np.testing.assert_allclose(penalized, [2.0, -4.0, 1.0, 0.5, -1.0])
    penalized = s._penalized(np.array([2.0, 1.9, 0, 0, 0], np.float32), [0])
    np.testing.assert_allclose(penalized[:2], [1.0, 1.9])  # positive: divided, once per token
    assert s(np.array([2.0, 1.9, 0, 0, 0], np.float32), [0]) == 1  # and greedy sees it
    whole = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=-1))
    np.testing.assert_allclose(whole._penalized(logits, [0, 1, 2])[:3], [1.0, -4.0, 0.5])
    off = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=0))
    assert off._penalized(logits, [0]) is logits


def test_openai_penalties_count_only_the_generated_tokens_and_bias_adds():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={"4": 10, 0: -1.5})
    assert params.logit_bias == ((0, -1.5), (4, 10.0))  # JSON's string keys are token ids
    s = Sampler(params)
    history = [0, 1, 2, 1, 1]  # the prompt is [0, 1]: its tokens are not counted
    penalized = s._penalized(logits, history, n_prompt=2)
    np.testing.assert_allclose(penalized, [2.0 - 1.5, 1.0 - 0.5 - 2 * 0.25, 0.5 - 0.5 - 0.25, 0.0, -1.0 + 10])
    assert s(logits, history, 2) == 4  # and greedy sees it
    np.testing.assert_allclose(s._penalized(logits, history)[1], 1.0 - 0.5 - 3 * 0.25)  # all generated
    assert Sampler(SamplingParams(temperature=0))._penalized(logits, history, 2) is logits  # off: no copy
    with pytest.raises(TorchlessError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={5: 1.0}))._penalized(logits, [])


def test_log_softmax_and_top_logprobs():
    from torchless.sampling import log_softmax, token_logprobs

    logits = _known_logits()
    np.testing.assert_allclose(np.exp(log_softmax(logits))[ORDER], PROBS, rtol=1e-6)
    lp, top = token_logprobs(logits, int(ORDER[3]), 2)
    assert lp == pytest.approx(np.log(PROBS[3]))
    assert [i for i, _ in top] == list(ORDER[:2]) and top[0][1] == pytest.approx(np.log(PROBS[0]))
    assert token_logprobs(logits, 0, 0)[1] == []


def test_sample_function():
    logits = _logits(3)
    assert sample(logits, temperature=0) == int(np.argmax(logits))
    assert sample(logits, temperature=1, seed=1) == sample(logits, temperature=1, seed=1)


# -- stop strings ------------------------------------------------------------------------------

def _reference_cut(text: str, stops: list[str]) -> str:
    """The text up to the stop string that is complete first (ties: the longest)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))]
    return text


def _run(pieces: list[str], stops: list[str]) -> str:
    f = StopStrings(stops)
    out = "".join(f.push(p) for p in pieces)
    return out + f.flush()


def test_stop_strings_examples():
    assert _run(["Hello wor", "ld. Bye"], ["world"]) == "Hello "
    assert _run(["a", "b", "c", "d"], ["abcd", "bc"]) == "a"
    assert _run(["abc"], ["bc", "abc"]) == ""
    assert _run(["no stop ", "here"], ["xyz"]) == "no stop here"
    assert _run(["ends with partial st"], ["stop"]) == "ends with partial st"


def test_stop_strings_hold_back_only_possible_starts():
    f = StopStrings(["</s>"])
    assert f.push("one <") == "one "
    assert f.push("/") == ""
    assert f.push("x") == "</x"  # not a stop after all: released at once
    assert f.push("</s> more") == ""
    assert f.stopped and f.push("again") == "" and f.flush() == ""


alphabet = st.text(alphabet="ab\n", max_size=30)


@settings(max_examples=400, deadline=None)
@given(text=alphabet, stops=st.lists(st.text(alphabet="ab\n", min_size=0, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_any_split_gives_the_unsplit_output(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert _run(pieces, stops) == _run([text], stops) == _reference_cut(text, stops)


# -- the generation loop, on a fake model --------------------------------------------------------

class FakeModel:
    """Logits that favour (last token + 1) % vocab: the sequence counts up."""

    class config:
        context_length = 16
        vocab_size = 10

    def __init__(self):
        self.calls = []

    def _set(self, state, token):
        state.logits[:] = 0
        state.logits[(token + 1) % 10] = 10

    def prefill(self, state, tokens):
        self.calls.append(("prefill", list(tokens)))
        state.pos += len(tokens)
        self._set(state, tokens[-1])

    def fast_forward(self, state, token):
        self.calls.append(("forward", token))
        assert state.pos < self.config.context_length
        state.pos += 1
        self._set(state, token)


class FakeState:
    def __init__(self, max_seq_len=16):
        self.pos, self.logits, self.max_seq_len = 0, np.zeros(10, np.float32), max_seq_len


def _collect(gen):
    out = []
    while True:
        try:
            out.append(next(gen))
        except StopIteration as end:
            return out, end.value


def test_generate_counts_up_and_stops_at_max_tokens():
    model, greedy = FakeModel(), Sampler(SamplingParams(temperature=0))
    tokens, reason = _collect(generate_tokens(model, FakeState(), [1, 2], greedy, max_tokens=4))
    assert tokens == [3, 4, 5, 6] and reason == "length"
    assert model.calls == [("prefill", [1, 2]), ("forward", 3), ("forward", 4), ("forward", 5)]


def test_generate_stops_on_eos_without_yielding_it():
    tokens, reason = _collect(generate_tokens(FakeModel(), FakeState(), [1], Sampler(SamplingParams(temperature=0)),
                                              max_tokens=100, eos_ids={5}))
    assert tokens == [2, 3, 4] and reason == "stop"


def test_generate_stops_when_the_context_is_full():
    greedy = Sampler(SamplingParams(temperature=0))
    tokens, reason = _collect(generate_tokens(FakeModel(), FakeState(8), [0, 1, 2], greedy, max_tokens=None))
    assert len(tokens) == 5 and reason == "length"  # 3 prompt + 5 generated = the context of 8


@pytest.mark.parametrize("n_prompt", [8, 9, 40])
def test_generate_rejects_a_prompt_that_does_not_fit(n_prompt):
    gen = generate_tokens(FakeModel(), FakeState(8), list(range(n_prompt)), Sampler(), max_tokens=1)
    with pytest.raises(ContextOverflowError, match=f"prompt has {n_prompt} tokens but the context is 8"):
        next(gen)


def test_generate_rejects_an_empty_prompt():
    with pytest.raises(TorchlessError, match="empty"):
        next(generate_tokens(FakeModel(), FakeState(), [], Sampler(), max_tokens=1))


def _reference_keep(logits, temperature, top_p, min_p):
    """The kept ids by a full sort of the vocabulary (best first, ties by id)."""
    order = np.lexsort((np.arange(len(logits)), -logits))
    scaled = logits[order].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    keep = len(probs)
    if top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), top_p)) + 1)
    if min_p > 0.0:
        keep = min(keep, int(np.count_nonzero(probs >= min_p * probs[0])))
    return order[:max(keep, 1)], probs[:max(keep, 1)] / probs[:max(keep, 1)].sum()


# Spreads of the logits chosen so that the cut falls in the first head of 256 (4.0, 6.0), past
# it (2.0: top-p 0.8 needs ~700 tokens, min-p 0.02 keeps 353), or near the vocabulary's end.
@pytest.mark.parametrize("top_p, min_p, spread", [(0.9, 0.0, 4.0), (0.8, 0.0, 2.0), (1.0, 0.02, 2.0),
                                                  (0.99, 0.0, 1.5), (0.5, 0.2, 6.0), (0.999, 1e-4, 0.5)])
def test_top_p_and_min_p_on_a_large_vocabulary_keep_what_a_full_sort_keeps(top_p, min_p, spread, monkeypatch):
    """Without top_k the sampler sorts only a head of the best candidates, grown until top-p's or
    min-p's cut falls inside it: it must keep exactly what sorting the whole vocabulary keeps,
    draw with the same frequencies, and sort the whole vocabulary only when it must."""
    logits = (np.random.default_rng(4).standard_normal(20000) * spread).astype(np.float32)
    ids, probs = _reference_keep(logits, 0.8, top_p, min_p)
    sorted_sizes = []
    lexsort = np.lexsort
    monkeypatch.setattr(np, "lexsort", lambda keys: sorted_sizes.append(len(keys[0])) or lexsort(keys))
    s = Sampler(SamplingParams(temperature=0.8, top_k=0, top_p=top_p, min_p=min_p, seed=5))
    kept_ids, kept_probs = s.kept(logits, len(logits))
    np.testing.assert_array_equal(kept_ids, ids)
    np.testing.assert_allclose(kept_probs / kept_probs.sum(), probs, rtol=1e-9)
    draws = np.array([s(logits) for _ in range(4000)])
    assert set(draws) <= set(ids)
    best = ids[:5]  # the likeliest few: frequencies within 4 binomial sigmas
    freq = np.array([np.count_nonzero(draws == i) for i in best]) / len(draws)
    tolerance = 4 * np.sqrt(probs[:5] * (1 - probs[:5]) / len(draws)) + 1e-3
    assert np.all(np.abs(freq - probs[:5]) <= tolerance), (freq, probs[:5])
    if len(ids) < 200:
        assert max(sorted_sizes) <= 256  # a short head sufficed: no vocabulary-sized sort


def test_sampling_without_a_cut_sorts_nothing(monkeypatch):
    monkeypatch.setattr(np, "argsort", lambda *a, **k: pytest.fail("sorted"))
    monkeypatch.setattr(np, "lexsort", lambda *a, **k: pytest.fail("sorted"))
    freq = _frequencies(SamplingParams(temperature=1.0, seed=3, top_k=0, top_p=1.0, min_p=0.0))
    np.testing.assert_allclose(freq, _expected(8), atol=0.015)


def test_a_draw_over_the_whole_vocabulary_follows_the_softmax_across_its_blocks():
    # A draw without a cut sums the weights per block of 256 tokens and then searches its block:
    # heavy tokens on both sides of block edges (255 | 256, 767 | 768) and in the last, partial
    # block catch a draw that lands in the wrong block or one token off.
    vocab, heavy = 1000, np.array([3, 255, 256, 511, 600, 767, 768, 900, 998, 999])
    logits = np.full(vocab, -2.0, np.float32)
    logits[heavy] = np.log(np.arange(1, 11, dtype=np.float32)) + 3.0
    probs = np.exp(logits.astype(np.float64) / 0.8)
    probs /= probs.sum()
    s = Sampler(SamplingParams(temperature=0.8, seed=5, top_k=0, top_p=1.0, min_p=0.0))
    n = 40000
    freq = np.bincount([s(logits) for _ in range(n)], minlength=vocab) / n
    tolerance = 4 * np.sqrt(probs * (1 - probs) / n) + 1e-3
    assert np.all(np.abs(freq[heavy] - probs[heavy]) <= tolerance[heavy]), (freq[heavy], probs[heavy])
    light = np.setdiff1d(np.arange(vocab), heavy)
    assert abs(freq[light].sum() - probs[light].sum()) <= 4 * np.sqrt(probs[light].sum() / n) + 1e-3


def test_a_draw_at_the_very_end_of_the_mass_never_takes_a_masked_token():
    # Rounding may put a draw at or past its block's own sum; the draw then takes the block's
    # last token with any weight, never one masked to -inf. An rng at exactly 1.0 (past what
    # Generator.random returns) forces that end.
    class AtTheEnd:
        def random(self):
            return 1.0

    logits = np.random.default_rng(4).standard_normal(300).astype(np.float32)
    logits[290:] = -np.inf
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), rng=AtTheEnd())
    assert s(logits) == 289


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_a_draw_from_logits_with_nothing_to_draw_says_so(bad):
    logits = np.full(300, bad, np.float32)
    if np.isnan(bad):
        logits[:10] = np.arange(10)  # one NaN among finite logits spoils the softmax too
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    with pytest.raises(TorchlessError, match="NaN or all -inf"):
        s(logits)
