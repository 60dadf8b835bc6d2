"""One sequence's generation loop, short enough to read: a generator of token ids, after
mlx-lm's generate_step. The engine (engine/) is what the library and the server run on; this
loop is the readable statement of what it does for one sequence, and a test oracle for it."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import ContextOverflowError, TorchlessError


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
