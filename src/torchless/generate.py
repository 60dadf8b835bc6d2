"""The generation loop: a generator of token ids, after mlx-lm's generate_step."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import ContextOverflowError, TorchlessError
from .kernels.gemm import single_threaded_blas
from .model.mistral import Span


def context_size(model, state) -> int:
    """Tokens one sequence may hold: the model's context, or less where the state was made smaller."""
    return min(model.config.context_length, getattr(state, "max_seq_len", model.config.context_length))


def check_prompt_fits(n_prompt: int, n_ctx: int, start: int = 0) -> None:
    """A prompt must leave room for at least one generated token (llama-cpp-python's rule)."""
    if n_prompt == 0:
        raise TorchlessError("the prompt is empty (no tokens)")
    if start + n_prompt >= n_ctx:
        after = f" (after {start} already in the sequence)" if start else ""
        raise ContextOverflowError(f"prompt has {n_prompt} tokens{after} but the context is {n_ctx}")


def generate_tokens(model, state, prompt_ids: Sequence[int],
                    sampler: Callable[[np.ndarray, Sequence[int]], int],
                    max_tokens: int | None = None,
                    eos_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield generated token ids, continuing the sequence in `state` (usually fresh).

    Stops on an end-of-sequence token (not yielded), after max_tokens (None or <= 0: no limit),
    or when prompt and completion fill the context. The generator's return value (StopIteration
    .value) says why: "stop" for end of sequence, "length" otherwise.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    n_ctx = context_size(model, state)
    check_prompt_fits(len(prompt_ids), n_ctx, state.pos)
    budget = n_ctx - state.pos - len(prompt_ids)
    if max_tokens is not None and max_tokens > 0:
        budget = min(budget, max_tokens)
    eos_ids = frozenset(eos_ids)

    model.prefill(state, prompt_ids)
    history = list(prompt_ids)  # what the repetition penalty looks back over
    for produced in range(1, budget + 1):
        token = sampler(state.logits, history)
        if token in eos_ids:
            return "stop"
        yield token
        if produced == budget:
            break
        history.append(token)
        model.fast_forward(state, token)
    return "length"


class LocalRunner:
    """Runs each submitted micro-batch at once, on the whole model in this process.

    The runner interface, shared with the pipeline: new_state(max_seq_len); submit(tag, spans)
    queues a micro-batch (its logits: one row per span, that span's last token); collect()
    returns (tag, logits) of the oldest finished one; has_room(spans) says whether submitting
    more now stays within the runner's buffer budget."""

    def __init__(self, model):
        self.model, self._done = model, deque()

    def new_state(self, max_seq_len: int):
        return self.model.new_state(max_seq_len)

    def submit(self, tag, spans) -> None:
        with single_threaded_blas():  # the big products split over our own threads
            self._done.append((tag, self.model.forward_spans(spans)))

    def collect(self):
        return self._done.popleft()

    def has_room(self, spans) -> bool:
        return True


class BatchGenerator:
    """Generation for many prompts at once, each with its own sampler, budget and stop.

    Sequences are dealt round-robin into `n_micro_batches` micro-batches. A decode step of a
    micro-batch is one pass of all its sequences through the model, so each weight is read once
    per micro-batch; with a pipeline behind `runner`, the micro-batches are in different stages
    at once. Prompts go in first, `chunk_size` tokens at a time. Iterating yields
    (sequence, token, None) for each token and (sequence, None, finish_reason) at each end.
    """

    def __init__(self, runner, prompts: Sequence[Sequence[int]], samplers, max_tokens, n_ctx: int,
                 eos_ids: Iterable[int] = (), n_micro_batches: int = 1, chunk_size: int = 256):
        self.runner, self.samplers = runner, list(samplers)
        self.prompts = [[int(t) for t in p] for p in prompts]
        if len(self.samplers) != len(self.prompts):
            raise TorchlessError(f"{len(self.prompts)} prompts but {len(self.samplers)} samplers")
        self.eos_ids = frozenset(eos_ids)
        self.budget = []
        for p, limit in zip(self.prompts, max_tokens):
            check_prompt_fits(len(p), n_ctx)
            self.budget.append(min(n_ctx - len(p), limit) if limit is not None and limit > 0 else n_ctx - len(p))
        n = len(self.prompts)
        m = max(1, min(n_micro_batches, n))
        self.groups = [list(range(g, n, m)) for g in range(m)]
        self.states = [runner.new_state(n_ctx) for _ in range(n)]
        self.history = [list(p) for p in self.prompts]
        self.produced = [0] * n
        self.finished: list[str | None] = [None] * n
        self.chunk_size = chunk_size

    def cancel(self, seq: int, reason: str = "stop") -> None:
        """End a sequence early (a stop string matched); it leaves its micro-batch."""
        if self.finished[seq] is None:
            self.finished[seq] = reason

    def __iter__(self) -> Iterator[tuple[int, int | None, str | None]]:
        todo = deque()  # (tag, spans) not yet submitted: the runner may be out of buffer room
        for s, prompt in enumerate(self.prompts):
            for i in range(0, len(prompt), self.chunk_size):
                chunk = prompt[i:i + self.chunk_size]
                todo.append((("prefill", s, i + len(chunk) == len(prompt)),
                             [Span(self.states[s], chunk, i)]))
        pending, last_logits, waiting = 0, {}, [len(g) for g in self.groups]
        group_of = {s: g for g, members in enumerate(self.groups) for s in members}
        while todo or pending:
            while todo and (pending == 0 or self.runner.has_room(todo[0][1])):
                self.runner.submit(*todo.popleft())
                pending += 1
            tag, logits = self.runner.collect()
            pending -= 1
            if tag[0] == "prefill":
                _, s, last = tag
                if not last:
                    continue
                last_logits[s] = logits[-1]
                g = group_of[s]
                waiting[g] -= 1
                if waiting[g]:
                    continue  # a micro-batch starts decoding once all its prompts are in
                rows = [(s2, last_logits.pop(s2)) for s2 in self.groups[g]]
            else:
                rows = list(zip(tag[1], logits))
            step = []
            for s, row in rows:
                yield from self._sample(s, row, step)
            if step:
                todo.append((("decode", step),
                             [Span(self.states[s], [self.history[s][-1]], len(self.history[s]) - 1)
                              for s in step]))

    def _sample(self, s: int, logits: np.ndarray, step: list):
        if self.finished[s] is not None:  # cancelled while its micro-batch was in flight
            return
        token = self.samplers[s](logits, self.history[s])
        if token in self.eos_ids:
            self.finished[s] = "stop"
            yield s, None, "stop"
            return
        self.produced[s] += 1
        self.history[s].append(token)
        yield s, token, None
        if self.finished[s] is not None:  # the consumer cancelled it on this token
            return
        if self.produced[s] >= self.budget[s]:
            self.finished[s] = "length"
            yield s, None, "length"
        else:
            step.append(s)
