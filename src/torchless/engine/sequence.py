"""A sequence: one prompt and its completion, from admission to its finish reason (nano-vllm's
engine/sequence.py). It turns the logits of its last token into a token, and that token into
text: the tokenizer's stream decoder (never half a UTF-8 character), then the stop strings.

Asked to (`logprobs`: how many alternatives), it also records each sampled token's
log-probability under the raw logits (before penalties and temperature, as OpenAI reports
them), its best alternatives, and where its text starts in the decoded completion."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import numpy as np

from ..sampling import StopStrings, token_logprobs


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], sampler: Callable[[np.ndarray, list[int], int], int],
                 max_tokens: int, eos_ids: Iterable[int] = (), decoder=None,
                 stop: list[str] | str | None = None, index: int = 0,
                 logprobs: int | None = None, prompt_logprobs: bool = False):
        self.seq_id = next(Sequence._ids)
        self.index = index                  # the caller's name for it: a choice index
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.tokens = list(self.prompt_ids)  # prompt, then completion: what the sampler looks back on
        self.sampler = sampler
        self.max_tokens = max_tokens        # completion tokens at most (the scheduler's budget)
        self.eos_ids = frozenset(eos_ids)
        self.decoder, self.stops = decoder, StopStrings(stop)
        self.state = None                   # the runner's state (KV cache) while admitted
        self.n_scheduled = 0                # tokens sent to the runner
        self.n_cached = 0                   # tokens whose keys and values are in the cache
        self.cached_tokens = 0              # prompt tokens the prefix cache held: not run again
        self.in_flight = 0                  # micro-batches holding its tokens, not yet returned
        self.finish_reason: str | None = None
        self.logprobs = logprobs            # alternatives to record per token; None: record nothing
        # per sampled token (an end-of-sequence one too, though it adds no text and is not counted):
    # (token, logprob, [(id, logprob), ...], offset in the decoded text)
        self.token_logprobs: list[tuple] = []
        self.wants_prompt_logprobs = prompt_logprobs  # echo: score the prompt too (Engine.add)
        self.prompt_logprobs: list[tuple] | None = None  # per prompt token; the first has none
        self._decoded = 0                   # characters the decoder has produced

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def max_len(self) -> int:
        """Positions this sequence can ever need: the size of its cache."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_span(self, budget: int) -> tuple[list[int], int]:
        """Up to `budget` tokens not yet sent to the runner, and the position of the first: a
        chunk of the prompt, or the one token sampled last. (Several chunks of a prompt may be
        in flight at once: a pipeline's stages run them in order.)"""
        start = self.n_scheduled
        tokens = self.tokens[start:start + budget]
        self.n_scheduled += len(tokens)
        self.in_flight += 1
        return tokens, start

    def returned(self, start: int, n: int) -> bool:
        """A micro-batch with tokens start..start+n of this sequence came back; True when it
        held the last token, so its logits give the next one."""
        self.in_flight -= 1
        self.n_cached = max(self.n_cached, start + n)
        return self.n_cached == len(self.tokens)

    @property
    def unscheduled(self) -> int:
        return len(self.tokens) - self.n_scheduled

    def take(self, logits: np.ndarray) -> str:
        """Sample the next token from the logits of the last one; return the text it adds
        (held back while it may be the start of a stop string). Sets finish_reason at the end."""
        token = int(self.sampler(logits, self.tokens, len(self.prompt_ids)))
        if self.logprobs is not None:  # (an end-of-sequence token too, as vLLM reports it)
            self.token_logprobs.append((token, *token_logprobs(logits, token, self.logprobs), self._decoded))
        if token in self.eos_ids:
            return self.finish("stop")
        self.tokens.append(token)
        piece = self.decoder.push(token) if self.decoder else ""
        self._decoded += len(piece)
        text = self.stops.push(piece) if self.decoder else ""
        if self.stops.stopped:
            self.finish_reason = "stop"
            return text
        if self.completion_tokens >= self.max_tokens:
            return text + self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        """End the sequence; the text still held by the decoder and the stop filter."""
        text = ""
        if self.decoder is not None and not self.stops.stopped:
            text = self.stops.push(self.decoder.flush()) + self.stops.flush()
        self.finish_reason = "stop" if self.stops.stopped else reason
        return text

    def score_prompt(self, logits: np.ndarray) -> None:
        """Record the prompt's logprobs from the logits of every prompt position (T, vocab):
        token i's comes from row i - 1; the first token has none."""
        top = self.logprobs or 0
        self.prompt_logprobs = [(self.prompt_ids[0], None, None)]
        for row, token in zip(logits[:-1], self.prompt_ids[1:]):
            self.prompt_logprobs.append((token, *token_logprobs(row, token, top)))
