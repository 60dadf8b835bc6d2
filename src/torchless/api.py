"""LLM: the high-level API, shaped like llama-cpp-python's `Llama`, with OpenAI-shaped results."""

from __future__ import annotations

import sys
import time
import uuid
from typing import Iterator

from .errors import TorchlessError
from .generate import check_prompt_fits, context_size, generate_tokens
from .hub import DEFAULT_MODEL
from .sampling import Sampler, SamplingParams, StopStrings


class LLM:
    """One model, one sequence at a time.

    >>> llm = LLM("smollm2", seed=0)
    >>> llm("The capital of France is", max_tokens=8)["choices"][0]["text"]
    """

    def __init__(self, model: str | None = None, *, n_ctx: int | None = None, seed: int | None = None,
                 verbose: bool = False, parallel=None):
        from .loader import Parameters
        from .model.parallel import load_for

        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0):
            raise TorchlessError(f"n_ctx must be a positive integer (0 or None: the model's), got {n_ctx!r}")
        if seed is not None:
            SamplingParams(seed=seed)  # validates it
        start = time.perf_counter()
        self.params = Parameters.load(model if model is not None else DEFAULT_MODEL)
        # parallel: a ParallelConfig or its string form ("tp=2"); under mpiexec each rank
        # holds a shard, every rank runs this same loop, and rank 0's sampled token is used.
        self.model, self._group = load_for(self.params, parallel)
        self.tokenizer = self.params.tokenizer
        self.config = self.model.config
        self.state = self.model.new_state(max_seq_len=n_ctx or None)
        self.model_path = str(self.params.path)
        self.seed = seed
        self.verbose = verbose
        self.load_time = time.perf_counter() - start
        self._rng = None if seed is None else Sampler(SamplingParams(seed=seed)).rng
        self._request = 0  # a newer request invalidates an unfinished stream over the same state
        if verbose:
            print(f"torchless: loaded {self.model_path} ({self.config.architecture}, "
                  f"{self.config.n_layers} layers, context {self.n_ctx}) in {self.load_time:.2f} s",
                  file=sys.stderr)

    @property
    def n_ctx(self) -> int:
        return context_size(self.model, self.state)

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes, add_bos: bool | None = None, special: bool = True) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    # -- completions -------------------------------------------------------------------------

    def create_completion(self, prompt: str | list[int], max_tokens: int | None = 16,
                          temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          stream: bool = False):
        """OpenAI's text_completion dict, or with stream=True an iterator of its chunks.

        max_tokens None or <= 0 generates until end of sequence or a full context.
        """
        ids = self._prompt_ids(prompt)
        pieces = self._pieces(ids, self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed),
                              max_tokens, stop)
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion",
                    created=int(time.time()), model=self.model_path)
        if stream:
            return self._completion_chunks(pieces, meta, len(ids))
        text, reason, n = "", None, 0
        for piece, reason, n in pieces:
            text += piece
        return dict(meta, choices=[dict(text=text, index=0, logprobs=None, finish_reason=reason)],
                    usage=_usage(len(ids), n))

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, repeat_penalty: float = 1.0,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               stream: bool = False):
        """OpenAI's chat.completion dict (or chat.completion.chunk iterator), via the model's template."""
        ids = self._prompt_ids(self._render_chat(messages), template=True)
        pieces = self._pieces(ids, self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed),
                              max_tokens, stop)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_path)
        if stream:
            return self._chat_chunks(pieces, meta, len(ids))
        text, reason, n = "", None, 0
        for piece, reason, n in pieces:
            text += piece
        return dict(meta, object="chat.completion",
                    choices=[dict(index=0, message=dict(role="assistant", content=text),
                                  logprobs=None, finish_reason=reason)],
                    usage=_usage(len(ids), n))

    # -- internals ---------------------------------------------------------------------------

    def _sampler(self, temperature, top_k, top_p, min_p, repeat_penalty, seed) -> Sampler:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        # Without a per-call seed, calls share the LLM's generator, so seed=... on LLM makes a
        # whole session reproducible (llama-cpp-python's behaviour).
        sampler = Sampler(params, rng=self._rng if seed is None else None)
        return sampler if self._group is None else _RankZeroSampler(sampler, self._group)

    def _prompt_ids(self, prompt, template: bool = False) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            ids = self.tokenize(prompt)
            bos = self.tokenizer.bos_id
            if template and len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:
                ids = ids[1:]  # the template wrote BOS itself, and the tokenizer added another
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise TorchlessError("prompt must be a string or a list of token ids") from None
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise TorchlessError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        check_prompt_fits(len(ids), self.n_ctx)  # now, not at the first next() of a stream
        return ids

    def _render_chat(self, messages) -> str:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TorchlessError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TorchlessError(f"each message needs a string 'role' and 'content', got {m!r}")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def _pieces(self, ids, sampler, max_tokens, stop) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text, finish_reason, completion_tokens); finish_reason is set on the last item only.

        Text goes through the tokenizer's stream decoder (never half a UTF-8 character) and then
        the stop-string filter, streamed or not, so both give the same text.
        """
        stops = StopStrings(stop)
        self._request += 1
        request = self._request
        return self._run(ids, sampler, max_tokens, stops, request)

    def _run(self, ids, sampler, max_tokens, stops, request):
        self.state.reset()
        decoder = self.tokenizer.stream_decoder()
        tokens = generate_tokens(self.model, self.state, ids, sampler, max_tokens, self.tokenizer.eos_ids)
        n, reason = 0, "length"
        while True:
            if request != self._request:
                raise TorchlessError("this stream was interrupted: a newer request reused the model's state")
            try:
                token = next(tokens)
            except StopIteration as end:
                reason = end.value or "length"
                break
            n += 1
            text = stops.push(decoder.push(token))
            if stops.stopped:
                tokens.close()
                yield text, "stop", n
                return
            if text:
                yield text, None, n
        text = stops.push(decoder.flush())
        yield text + stops.flush(), "stop" if stops.stopped else reason, n

    def _completion_chunks(self, pieces, meta, n_prompt):
        for text, reason, n in pieces:
            chunk = dict(meta, choices=[dict(text=text, index=0, logprobs=None, finish_reason=reason)])
            if reason is not None:
                chunk["usage"] = _usage(n_prompt, n)
            yield chunk

    def _chat_chunks(self, pieces, meta, n_prompt):
        meta = dict(meta, object="chat.completion.chunk")
        yield dict(meta, choices=[dict(index=0, delta=dict(role="assistant"), logprobs=None, finish_reason=None)])
        for text, reason, n in pieces:
            if text:
                yield dict(meta, choices=[dict(index=0, delta=dict(content=text), logprobs=None,
                                               finish_reason=None)])
            if reason is not None:
                yield dict(meta, choices=[dict(index=0, delta={}, logprobs=None, finish_reason=reason)],
                           usage=_usage(n_prompt, n))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


class _RankZeroSampler:
    """Under MPI, rank 0 samples and the others take its token, so that no rank can diverge on
    a float tie and leave the others waiting in a collective."""

    def __init__(self, sampler, group):
        self.sampler, self.group = sampler, group

    def __call__(self, logits, history):
        token = self.sampler(logits, history) if self.group.rank == 0 else None
        return self.group.broadcast_object(token, root=0)
