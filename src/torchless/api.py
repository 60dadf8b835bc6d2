"""LLM: the high-level API, shaped like llama-cpp-python's `Llama`, with OpenAI-shaped results."""

from __future__ import annotations

import sys
import time
import uuid
from typing import Iterator

from .errors import TorchlessError
from .generate import BatchGenerator, LocalRunner, check_prompt_fits, context_size, generate_tokens
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
        # parallel: a ParallelConfig or its string form ("tp=2", "pp=2,mb=4"). Under mpiexec
        # every rank makes the same calls: tensor-parallel ranks all run the loop and take rank
        # 0's sampled token; in a pipeline the last stage samples and rank 0 streams the text.
        self.model, self._group = load_for(self.params, parallel)
        self._remote_sampling = hasattr(self.model, "serve")  # an MPI pipeline: the last rank samples
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
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion",
                    created=int(time.time()), model=self.model_path)
        # Several prompts, as OpenAI's API takes them: one choice each. A pipeline over MPI
        # ranks runs even one prompt this way: its last stage samples, and rank 0 streams.
        if _is_batch(prompt) or self._remote_sampling:
            prompts = [self._prompt_ids(p) for p in (prompt if _is_batch(prompt) else [prompt])]
            samplers = [self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
                        for _ in prompts]
            chunks = self._batch_chunks(prompts, samplers, max_tokens, stop, meta)
            return chunks if stream else _merge_chunks(chunks, meta, len(prompts))
        ids = self._prompt_ids(prompt)
        pieces = self._pieces(ids, self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed),
                              max_tokens, stop)
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
        if self._remote_sampling:
            raise TorchlessError("chat over a pipeline of MPI ranks is not supported yet; use "
                                 "generate (or --parallel pp=S without mpiexec: stages on threads)")
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

    def _batch_chunks(self, prompts, samplers, max_tokens, stop, meta):
        """text_completion chunks of a batch, each naming its choice by index, as tokens come."""
        if hasattr(self.model, "runner"):
            runner = self.model.runner()
        elif hasattr(self.model, "forward_spans"):
            runner = LocalRunner(self.model)
        else:
            raise TorchlessError("batched generation is not supported with in-process tensor "
                                 "parallelism; use --parallel pp=... or one process")
        if self._remote_sampling:
            if not self.model.is_driver:  # a later stage: serve until rank 0 ends the batch
                self.model.serve(samplers, [list(p) for p in prompts])
                return
            samplers = [_take_token] * len(prompts)  # the last stage sampled already
        batch = BatchGenerator(runner, prompts, samplers, [max_tokens] * len(prompts), self.n_ctx,
                               self.tokenizer.eos_ids, getattr(self.model, "n_micro_batches", 1))
        try:
            yield from self._batch_events(batch, prompts, stop, meta)
        finally:
            if hasattr(runner, "end_batch"):
                runner.end_batch()

    def _batch_events(self, batch, prompts, stop, meta):
        decoders = [self.tokenizer.stream_decoder() for _ in prompts]
        stops = [StopStrings(stop) for _ in prompts]
        counts = [0] * len(prompts)
        for seq, token, reason in batch:
            if token is not None:
                counts[seq] += 1
                text = stops[seq].push(decoders[seq].push(token))
                if not stops[seq].stopped:
                    if text:
                        yield dict(meta, choices=[dict(text=text, index=seq, logprobs=None, finish_reason=None)])
                    continue
                batch.cancel(seq)
                reason = "stop"
            else:
                text = stops[seq].push(decoders[seq].flush()) + stops[seq].flush()
                reason = "stop" if stops[seq].stopped else reason
            yield dict(meta, choices=[dict(text=text, index=seq, logprobs=None, finish_reason=reason)],
                       usage=_usage(len(prompts[seq]), counts[seq]))

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


def _is_batch(prompt) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, (str, bytes, list, tuple)) for p in prompt)


def _merge_chunks(chunks, meta, n: int) -> dict:
    """The non-streamed text_completion of a batch: its chunks joined per choice."""
    texts, reasons, usage = [""] * n, [None] * n, [None] * n
    for chunk in chunks:
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            reasons[choice["index"]], usage[choice["index"]] = choice["finish_reason"], chunk["usage"]
    # (a later stage of an MPI pipeline gets no chunks: its result is empty; rank 0 has the text)
    total = {k: sum((u or {}).get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return dict(meta, choices=[dict(text=t, index=i, logprobs=None, finish_reason=r)
                               for i, (t, r) in enumerate(zip(texts, reasons))], usage=total)


def _take_token(token, history) -> int:
    """Rank 0's "sampler" in an MPI pipeline: the last stage sent the token itself."""
    return int(token)
