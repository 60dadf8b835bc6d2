"""Choosing the next token: SamplingParams (validated), Sampler, and stop-string handling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from numba import njit

from .errors import TorchlessError
from .kernels.fused import exp_parts


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's settings and defaults. temperature 0 means greedy; top_k 0 means no limit;
    repeat_last_n -1 means the whole history; seed None means a fresh random seed.

    presence_penalty and frequency_penalty are OpenAI's: subtracted from the logit of each token
    already generated (not the prompt's), once, and once per occurrence. logit_bias maps token
    ids to a value in [-100, 100] added to their logits (a dict; kept as sorted pairs)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()

    def __post_init__(self):
        def number(name, allowed, ok):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TorchlessError(f"{name} must be a number {allowed}, got {value!r}")
            if math.isnan(value) or not ok(float(value)):
                raise TorchlessError(f"{name} must be {allowed}, got {value!r}")
            object.__setattr__(self, name, float(value))

        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise TorchlessError(f"{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))

        number("temperature", ">= 0 and finite (0 = greedy)", lambda v: 0 <= v < math.inf)
        number("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        number("min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        number("repeat_penalty", "> 0 and finite (1 = off)", lambda v: 0 < v < math.inf)
        number("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        number("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        integer("top_k", 0)
        integer("repeat_last_n", -1)
        if self.seed is not None:
            integer("seed", 0)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether any setting changes the logits before the choice (penalties, bias)."""
        return (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or bool(self.logit_bias))


def _logit_bias(bias) -> tuple:
    """{token id (int or its decimal string, as JSON keys are): bias} -> sorted (id, bias) pairs."""
    pairs = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = list(pairs or ())
    except TypeError:
        raise TorchlessError(f"logit_bias must map token ids to numbers, got {bias!r}") from None
    out = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TorchlessError(f"logit_bias must map token ids to numbers, got {bias!r}")
        key, value = pair
        try:
            token = int(key) if isinstance(key, (int, np.integer, str)) and not isinstance(key, bool) else None
        except ValueError:
            token = None
        if token is None or token < 0:
            raise TorchlessError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not -100 <= value <= 100:
            raise TorchlessError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}")
        out[token] = float(value)
    return tuple(sorted(out.items()))


_BLOCK = 256  # tokens per partial sum of a whole-vocabulary draw (draw_softmax)
_HEAD = 256  # candidates first sorted for top-p / min-p without top-k (grown 8x while too few)


@njit(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy")
def draw_softmax(logits, best, inv_temperature, u, weights, bits):
    """The token whose cumulative weight first passes u times the total: weights
    exp((logit - best) / temperature) in float32 (fused.exp_parts; a token masked to -inf, or
    under e^-87 of the best, weighs 0), summed in float64 per block of _BLOCK tokens; the draw
    finds its block, then its token inside. As NumPy expressions (exp, np.add.reduceat,
    searchsorted) a draw over SmolLM2's 49k vocabulary took 105-130 us, a twentieth of a
    16-client server's engine thread. best: the largest logit (NumPy's max is vectorized; a
    loop here is not, without assuming no infinities)."""
    n = logits.shape[0]
    t = np.float32(inv_temperature)
    for i in range(n):
        weights[i] = exp_parts((logits[i] - best) * t, bits, i)
    scale = bits.view(np.float32)
    for i in range(n):
        weights[i] = weights[i] * scale[i] if (logits[i] - best) * t >= np.float32(-87.0) else np.float32(0.0)
    cumulative = _block_sums(weights)
    draw = u * cumulative[-1]
    block = len(cumulative) - 1
    for b in range(len(cumulative)):
        if cumulative[b] > draw:
            block = b
            break
    if block:
        draw -= cumulative[block - 1]
    # past the block's sum only by rounding: then its last token with any weight
    inside, choice = 0.0, -1
    for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
        if weights[i] > 0.0:
            choice = i
            inside += weights[i]
            if inside > draw:
                return i
    return choice


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _block_sums(weights):
    """Running float64 sums of weights at the end of each block of _BLOCK (reassociated within
    a block, so that the sum is vectorized)."""
    n = weights.shape[0]
    cumulative = np.empty((n + _BLOCK - 1) // _BLOCK, np.float64)
    total = 0.0
    for b in range(cumulative.shape[0]):
        block = weights[b * _BLOCK:min(n, (b + 1) * _BLOCK)]  # (indexed from 0: vectorized; 3.6x)
        part = 0.0
        for i in range(block.shape[0]):
            part += np.float64(block[i])
        total += part
        cumulative[b] = total
    return cumulative


class Sampler:
    """`sampler(logits, history) -> token id`, built once per request (mlx-lm's make_sampler).

    The order is Hugging Face's: repetition penalty (then OpenAI's presence and frequency
    penalties and logit_bias), top-k, temperature, softmax, top-p, min-p. Only the top-k
    candidates are sorted, so with top_k set no vocab-sized sort runs per token.
    `history[n_prompt:]` is the generated part, what presence and frequency penalties count.
    """

    def __init__(self, params: SamplingParams | None = None, rng: np.random.Generator | None = None):
        self.params = params or SamplingParams()
        self.rng = rng if rng is not None else np.random.default_rng(self.params.seed)
        self._work: np.ndarray | None = None  # (vocab,) float32, reused across calls
        self._weights = self._bits = None  # draw_softmax's scratch, (vocab,), reused too

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), n_prompt: int = 0) -> int:
        p = self.params
        logits = self._penalized(logits, history, n_prompt)
        if p.greedy:
            return int(np.argmax(logits))

        vocab = logits.shape[0]
        top_k = p.top_k if 0 < p.top_k < vocab else vocab
        if top_k == vocab and p.top_p >= 1.0 and p.min_p <= 0.0:
            # Nothing to cut: draw from the softmax in vocabulary order, with no sort (a sort of
            # a 49k vocabulary per token was half a 16-client server's engine thread).
            return self._draw_softmax(logits)
        candidates, probs = self.kept(logits, top_k)
        cumulative = np.cumsum(probs)
        draw = self.rng.random() * cumulative[-1]
        choice = min(int(np.searchsorted(cumulative, draw, side="right")), len(probs) - 1)
        return int(candidates[choice])

    def _draw_softmax(self, logits: np.ndarray) -> int:
        """A token drawn from softmax(logits / temperature) over the whole vocabulary, in one
        compiled call (draw_softmax); one uniform number from the request's generator."""
        if self._weights is None or self._weights.shape != logits.shape:
            self._weights = np.empty(logits.shape, np.float32)
            self._bits = np.empty(logits.shape, np.int32)
        logits = np.ascontiguousarray(logits, np.float32)
        token = int(draw_softmax(logits, logits.max(), 1.0 / self.params.temperature, self.rng.random(),
                                 self._weights, self._bits))
        if token < 0:  # every weight 0 or NaN
            raise TorchlessError("no token can be drawn: the logits are NaN or all -inf")
        return token

    def kept(self, logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens top-k, top-p and min-p keep, best first, and their probabilities (not yet
        renormalized over them)."""
        p = self.params
        candidates, probs = self._best_first(logits, top_k)
        keep = len(probs)
        if p.top_p < 1.0:  # the smallest prefix whose mass reaches top_p (at least one token)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:  # tokens at least min_p times as likely as the best (sorted, so a prefix)
            keep = min(keep, int(np.count_nonzero(probs >= p.min_p * probs[0])))
        keep = max(keep, 1)
        return candidates[:keep], probs[:keep]

    def _best_first(self, logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The candidates best first (ties by id) and their softmax probabilities at the
        temperature: the top_k alone (normalized over them, as Hugging Face's top-k does), or,
        with no top_k, as many of the best as top-p and min-p can keep, found without sorting
        the whole vocabulary when a short head holds them, and normalized over all of it."""
        p, vocab = self.params, logits.shape[0]
        if top_k < vocab:
            return self._sorted_probs(logits, np.argpartition(logits, vocab - top_k)[vocab - top_k:], None)
        scaled = logits.astype(np.float64) / p.temperature
        log_total = scaled.max() + np.log(np.exp(scaled - scaled.max()).sum())
        head = min(vocab, _HEAD)
        while True:
            candidates = np.arange(vocab) if head == vocab else np.argpartition(logits, vocab - head)[vocab - head:]
            candidates, probs = self._sorted_probs(logits, candidates, log_total)
            # the kept prefix (the shorter of top-p's and min-p's) lies in the head when either
            # ends inside it: the head's mass reaches top_p, or its last is under min_p of the best
            top_p_inside = p.top_p < 1.0 and probs.sum() >= p.top_p
            min_p_inside = p.min_p > 0.0 and probs[-1] < p.min_p * probs[0]
            if head == vocab or top_p_inside or min_p_inside:
                return candidates, probs
            head = min(vocab, head * 8)

    def _sorted_probs(self, logits, candidates, log_total):
        candidates = candidates[np.lexsort((candidates, -logits[candidates]))]  # best first, ties by id
        scaled = logits[candidates].astype(np.float64) / self.params.temperature
        if log_total is None:  # normalized over the candidates
            probs = np.exp(scaled - scaled[0])
            return candidates, probs / probs.sum()
        return candidates, np.exp(scaled - log_total)

    def _penalized(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> np.ndarray:
        """The logits after the penalties and the bias, in a work copy (the caller's stay as they
        are; with none of them set, the caller's own array). llama.cpp's repetition penalty: over
        the last repeat_last_n tokens, positive logits divided by it and negative ones multiplied,
        once per distinct token. OpenAI's: presence_penalty once and frequency_penalty once per
        occurrence, subtracted for each token of history[n_prompt:]. Then logit_bias is added."""
        p = self.params
        n = len(history) if p.repeat_last_n == -1 else p.repeat_last_n
        repeat = p.repeat_penalty != 1.0 and n > 0 and len(history) > 0
        generated = history[n_prompt:] if (p.presence_penalty or p.frequency_penalty) else ()
        if not (repeat or len(generated) or p.logit_bias):
            return logits
        if self._work is None or self._work.shape != logits.shape:
            self._work = np.empty(logits.shape, np.float32)
        work = self._work
        np.copyto(work, logits)
        if repeat:
            recent = np.unique(np.asarray(history[-n:], dtype=np.int64))
            values = work[recent]
            work[recent] = np.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        if len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            work[ids] -= (p.presence_penalty + p.frequency_penalty * counts).astype(np.float32)
        if p.logit_bias:
            ids, bias = (np.array(v) for v in zip(*p.logit_bias))
            if ids[-1] >= len(work):
                raise TorchlessError(f"logit_bias names token {ids[-1]}, outside the vocabulary "
                                     f"(0..{len(work) - 1})")
            work[ids] += bias.astype(np.float32)
        return work


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token (float64), of the raw logits: what logprobs report."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token`, and the `top` most likely tokens with theirs (best first)."""
    lp = log_softmax(logits)
    best = []
    if top > 0:
        top = min(top, len(lp))
        ids = np.argpartition(-lp, top - 1)[:top]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = [(int(i), float(lp[i])) for i in ids]
    return float(lp[token]), best


def sample(logits: np.ndarray, history: Sequence[int] = (), **params) -> int:
    """One-off convenience: `sample(logits, temperature=0.7, top_k=20, seed=1)`."""
    return Sampler(SamplingParams(**params))(logits, history)


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may be the start of one.

    "First" means the match that is complete earliest in the text (ties: the longest), which is
    what a stream can know at that moment; so the output never depends on how the text was split.
    """

    def __init__(self, stops: Iterable[str] | str | None = None):
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops or ())
        for s in stops:
            if not isinstance(s, str):
                raise TorchlessError(f"stop strings must be strings, got {s!r}")
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._pending = ""

    def push(self, text: str) -> str:
        """Add text; return what can be emitted now. After a match, returns '' forever."""
        if self.stopped:
            return ""
        buf = self._pending + text
        best = None  # (end, -length) of the earliest-ending, then longest, match
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best):
                best = (i + len(s), -len(s))
        if best is not None:
            self.stopped, self._pending = True, ""
            return buf[:best[0] + best[1]]
        hold = self._held_suffix(buf)
        self._pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The end of the text: what was held back is not a stop string after all."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[len(buf) - k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
