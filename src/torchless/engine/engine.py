"""The engine: `step()` runs one micro-batch through the runner and samples what comes back.

A step first fills the runner: while fewer micro-batches are in flight than the runner's
`depth` (1 for a model in this process; the micro-batch count of a pipeline, whose stages work
on different micro-batches at once), it admits waiting sequences and submits the next micro-
batch the scheduler makes. Then it collects the oldest micro-batch in flight, samples the next
token of each sequence in it whose tokens are now all cached, and returns what happened as
events. Sequences that finish leave the batch and their caches are released.

Failure stays with the sequences it touches: if running a micro-batch raises, each of its
sequences ends with an "error" event carrying the message, and the others go on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import TorchlessError
from ..model.mistral import Span
from .prefix_cache import PrefixCache
from .scheduler import Scheduler
from .sequence import Sequence


# Keys and values of recent prompts' prefixes kept for reuse (prefix_cache.py): 256 MiB holds
# ~5,700 positions of SmolLM2, ~2,000 of a Llama-3-8B-like model (128 KiB a position).
PREFIX_CACHE_BYTES = 256 * 2**20


@dataclass
class Event:
    """What one step did to one sequence: `text` it added (may be empty), and `finish_reason`
    ("stop", "length", "error") when it ended; `error` holds the message of an "error"."""
    seq: Sequence
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class Engine:
    def __init__(self, runner, max_batch: int = 8, chunk_size: int = 256,
                 kv_budget_bytes: int | None = None, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        self.runner = runner
        self.served_by = None  # the server's engine thread, once it steps this engine alone
        self.scheduler = Scheduler(max_batch, chunk_size, kv_budget_bytes, runner.cache_bytes)
        if prefix_cache_bytes < 0:
            raise TorchlessError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._in_flight: dict[int, list] = {}
        self._tags = itertools.count()
        self.tokens_generated = 0

    def add(self, seq: Sequence) -> Sequence:
        if seq.wants_prompt_logprobs and seq.prompt_logprobs is None:
            seq.score_prompt(self.prompt_logits(seq.prompt_ids))
        self.scheduler.add(seq)
        return seq

    @property
    def can_score_prompts(self) -> bool:
        """Whether prompt_logits can run: a runner in this process that holds nothing between steps."""
        return self.runner.depth == 1 and self.runner.group is None

    def prompt_logits(self, ids: list[int]):
        """The logits of every position of a prompt (T, vocab), in a pass of its own, outside the
        batch (echo with logprobs needs them all; a micro-batch keeps only each span's last)."""
        if not self.can_score_prompts:
            raise TorchlessError("the prompt's logprobs (echo with logprobs) need the model in one "
                                 "process without a pipeline")
        state = self.runner.new_state(len(ids))
        try:
            return self.runner.model.prefill(state, ids, all_logits=True)
        finally:
            self.runner.release(state)

    def cancel(self, seq: Sequence) -> None:
        """End a sequence at the next token boundary (its client went away, or it was
        superseded); a sequence in flight is dropped when its micro-batch returns."""
        if not seq.finished:
            seq.finish_reason = "cancelled"
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self._in_flight) or self.scheduler.has_work()

    @property
    def batch_size(self) -> int:
        return len(self.scheduler.running)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[Event]:
        events = self._fill()
        if not self._in_flight:
            return events
        try:
            tag, logits = self.runner.collect()
        except Exception as e:  # noqa: BLE001 - the runner is broken: everything in it fails
            return events + self._fail(list(self._in_flight), e)
        batch = self._in_flight.pop(tag)
        if isinstance(logits, BaseException):  # this micro-batch failed; the runner goes on
            return events + self._fail_batch(batch, logits)
        for (seq, tokens, start), row in zip(batch, logits):
            last = seq.returned(start, len(tokens))
            if seq.finished:  # cancelled while in flight
                self._release(seq)
                continue
            if not last:  # a prompt chunk that is not the last
                continue
            if seq.completion_tokens == 0:  # its whole prompt is in its cache now: for the
                self._keep_prefix(seq, seq.prompt_ids)  # others sharing its start meanwhile
            before = seq.completion_tokens
            try:
                text = seq.take(row)
            except TorchlessError as e:  # e.g. logits with nothing to draw: this sequence fails
                events.append(self._error_event(seq, e))
                self._release(seq)
                continue
            self.tokens_generated += seq.completion_tokens - before
            events.append(Event(seq, text, seq.finish_reason))
            if seq.finished:
                self._release(seq)
        return events

    def _fill(self) -> list[Event]:
        events = []
        while len(self._in_flight) < self.runner.depth:
            try:
                admitted = self.scheduler.admit(self.runner.new_state)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for a cache
                seq = self.scheduler.waiting.popleft()
                events.append(self._error_event(seq, e))
                continue
            for seq in admitted:
                self._reuse_prefix(seq)
            rows = self.runner.micro_batch_rows(len(self.scheduler.running))
            batch = self._fit(self.scheduler.next_micro_batch(rows))
            if not batch:
                break
            spans = [Span(seq.state, tokens, start) for seq, tokens, start in batch]
            if self._in_flight and not self.runner.has_room(spans):
                self.scheduler.put_back(batch)
                break
            tag = next(self._tags)
            try:
                self.runner.submit(tag, spans)
            except Exception as e:  # noqa: BLE001 - e.g. a stopped pipeline: these sequences fail
                events += self._fail_batch(batch, e)
                continue
            self._in_flight[tag] = batch
        return events

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a new sequence's cache from the longest kept prefix of its prompt. The cache
        only saves work: if restoring fails (out of memory), the whole prompt runs instead,
        over whatever was half written."""
        caches = self.runner.caches(seq.state)
        if not caches or not self.prefix_cache.budget_bytes:
            return
        hit = self.prefix_cache.lookup(seq.prompt_ids, min(cache.ring_room() for cache in caches))
        if hit is None:
            return
        try:
            self.prefix_cache.restore(*hit, caches)
        except MemoryError:
            for cache in caches:
                cache.reset()
            return
        seq.n_scheduled = seq.n_cached = seq.cached_tokens = hit[1]

    def _keep_prefix(self, seq: Sequence, tokens: list[int]) -> None:
        """Keep the keys and values of `tokens` (all in the sequence's cache) for later prompts."""
        caches = self.runner.caches(seq.state)
        if caches and self.prefix_cache.budget_bytes:
            try:
                self.prefix_cache.store(tokens, caches, min(c.intact_prefix() for c in caches))
            except MemoryError:  # not kept: a later prompt runs in full
                pass

    def _fit(self, batch: list) -> list:
        """Drop sequences off the end of a micro-batch until the runner has room for it (a
        pipeline's buffer budget), down to one: they go in a later micro-batch."""
        while len(batch) > 1 and not self.runner.has_room(
                [Span(seq.state, tokens, start) for seq, tokens, start in batch]):
            self.scheduler.put_back(batch[-1:])
            batch = batch[:-1]
        return batch

    def _release(self, seq: Sequence) -> None:
        if seq.in_flight:  # a pipeline still holds some of its tokens: when they return
            return
        if seq.state is not None:
            # prompt and completion as run (a chat's next turn starts with them); of a failed
            # micro-batch nothing is kept, as its cache's position did not move (intact_prefix)
            self._keep_prefix(seq, seq.tokens[:seq.n_cached])
        state = self.scheduler.finish(seq)
        if state is not None:
            self.runner.release(state)

    def _fail_batch(self, batch, error: BaseException) -> list[Event]:
        events = []
        for seq, tokens, start in batch:
            seq.returned(start, len(tokens))
            if not seq.finished:
                events.append(self._error_event(seq, error))
            self._release(seq)
        return events

    def _fail(self, tags, error: BaseException) -> list[Event]:
        events = []
        for tag in tags:
            events += self._fail_batch(self._in_flight.pop(tag), error)
        return events

    @staticmethod
    def _error_event(seq: Sequence, error: BaseException) -> Event:
        seq.finish_reason = "error"
        message = str(error) if isinstance(error, TorchlessError) else f"{type(error).__name__}: {error}"
        return Event(seq, "", "error", message)

    def close(self) -> None:
        self.runner.close()
