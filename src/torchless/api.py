"""LLM: the high-level API, shaped like llama-cpp-python's `Llama`, with OpenAI-shaped results.

It validates, tokenizes and renders, then hands sequences to the engine (engine/) and shapes what
comes back.
"""

from __future__ import annotations

import sys
import time
import uuid
from functools import cached_property

import numpy as np

from .chat_template import template_variables
from .engine.engine import PREFIX_CACHE_BYTES
from .engine.sequence import Sequence
from .errors import TorchlessError
from .generate import check_prompt_fits
from .grammar import constrain, response_format_grammar, user_grammar
from .hub import DEFAULT_MODEL
from .logprobs import chat_logprobs, completion_logprobs, merge_completion_logprobs, prompt_offsets
from .sampling import Sampler, SamplingParams
from .tools import ToolCallStream, chat_with_tools, reply_message, tool_request

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default limit)


class LLM:
    """One model and its engine: any number of prompts, batched together.

    >>> llm = LLM("smollm2", seed=0)
    >>> llm("The capital of France is", max_tokens=8)["choices"][0]["text"]

    prefix_cache_bytes: memory for the keys and values of recent prompts' prefixes, so a prompt
    that starts as a recent one did (a system prompt, a conversation so far) runs only from
    where it differs; 0 turns it off. (Not under mpiexec, where the caches live on every rank.)

    Under mpiexec every rank creates the LLM and makes the same calls; rank 0 schedules, samples
    and returns the results, the other ranks run their part of each step and return empty ones.
    """

    def __init__(self, model: str | None = None, *, n_ctx: int | None = None, seed: int | None = None,
                 verbose: bool = False, parallel=None, max_batch: int = 64,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        from .engine import Engine, make_runner
        from .loader import Parameters

        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0):
            raise TorchlessError(f"n_ctx must be a positive integer (0 or None: the model's), got {n_ctx!r}")
        if seed is not None:
            SamplingParams(seed=seed)  # validates it
        start = time.perf_counter()
        self.params = Parameters.load(model if model is not None else DEFAULT_MODEL)
        # parallel: a ParallelConfig or its string form ("tp=2", "pp=2,mb=4").
        self.runner = make_runner(self.params, parallel)
        self.engine = Engine(self.runner, max_batch=max_batch, prefix_cache_bytes=prefix_cache_bytes)
        self.model = self.runner.model  # the seed's one-sequence interface (prefill, fast_forward)
        self.tokenizer = self.params.tokenizer
        self.config = self.runner.config
        self._n_ctx = min(n_ctx or self.config.context_length, self.config.context_length)
        self.model_path = str(self.params.path)
        self.seed = seed
        self.verbose = verbose
        self.load_time = time.perf_counter() - start
        self._rng = None if seed is None else Sampler(SamplingParams(seed=seed)).rng
        self._request = 0  # a newer request ends an unfinished stream
        self._active: list[Sequence] = []
        if verbose:
            print(f"torchless: loaded {self.model_path} ({self.config.architecture}, "
                  f"{self.config.n_layers} layers, context {self.n_ctx}) in {self.load_time:.2f} s",
                  file=sys.stderr)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @cached_property
    def state(self):
        """A state of one whole context, for the one-sequence loop (`generate_tokens`)."""
        return self.runner.new_state(self.n_ctx)

    def close(self) -> None:
        """Stop the runner's workers (and, under mpiexec, release the other ranks)."""
        self.runner.close()

    # -- tokens ------------------------------------------------------------------------------

    def create_embedding(self, input: str | list, model: str | None = None) -> dict:
        """OpenAI's embeddings list: per input (a text, or a list of token ids) the mean of its
        tokens' final hidden states (after the last norm), scaled to unit length, as llama.cpp
        gives for a decoder model with mean pooling."""
        self._check_not_served()
        return self._embeddings(input, model)

    def _embeddings(self, input, model=None) -> dict:
        """create_embedding's work, on the thread that steps the engine (the server's calls it)."""
        if not hasattr(self.model, "hidden_states"):
            raise TorchlessError("embeddings need the model in one process (no --parallel)")
        inputs = [input] if isinstance(input, str) or (input and isinstance(input[0], int)) else list(input)
        data, total = [], 0
        for i, item in enumerate(inputs):
            ids = self.tokenize(item) if isinstance(item, str) else [int(t) for t in item]
            if not ids:
                raise TorchlessError(f"input {i} has no tokens to embed")
            check_prompt_fits(len(ids), self.n_ctx)
            hidden = self.model.hidden_states(self.model.new_state(len(ids)), ids)
            vector = hidden.astype(np.float64).mean(0)
            norm = np.linalg.norm(vector)
            data.append({"object": "embedding", "index": i,
                         "embedding": (vector / norm if norm > 0 else vector).tolist()})
            total += len(ids)
        return {"object": "list", "data": data, "model": model or self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    def tokenize(self, text: str | bytes, add_bos: bool | None = None, special: bool = True) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    # -- completions -------------------------------------------------------------------------

    def create_completion(self, prompt: str | list[int] | list, max_tokens: int | None = 16,
                          temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          stream: bool = False, logprobs: int | None = None, echo: bool = False,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          logit_bias: dict | None = None, grammar=None):
        """OpenAI's text_completion dict, or with stream=True an iterator of its chunks. A list
        of prompts (strings or token-id lists) gives one choice each, generated as one batch.
        grammar: a GBNF grammar (text or LlamaGrammar) every completion is kept inside.

        max_tokens None or <= 0 generates until end of sequence or a full context. logprobs=N
        reports each token's log-probability (of the raw logits) and the N likeliest; echo puts
        the prompt before the completion (with logprobs, the prompt's too).
        """
        meta = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion",
                    created=int(time.time()), model=self.model_path)
        batch = list(prompt) if _is_batch(prompt) else [prompt]
        prompts = [self._prompt_ids(p) for p in batch]
        texts = [p if isinstance(p, str) else p.decode("utf-8", "replace") if isinstance(p, bytes)
                 else self.detokenize(ids) for p, ids in zip(batch, prompts)]
        logprobs = _top_count(logprobs, "logprobs")
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repeat_penalty=repeat_penalty, seed=seed, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        compiled = user_grammar(grammar, self.tokenizer, self.config.vocab_size)
        seqs = [self._sequence(ids, i, sampling, max_tokens, stop, logprobs, echo, compiled)
                for i, ids in enumerate(prompts)]
        for seq in seqs:  # now, so that the echoed prompt's chunk has them
            if seq.wants_prompt_logprobs:
                self._check_not_served()
                seq.score_prompt(self.engine.prompt_logits(seq.prompt_ids))
        chunks = self._completion_chunks(seqs, meta, texts, echo)
        return chunks if stream else _merge_chunks(chunks, meta, len(seqs))

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, repeat_penalty: float = 1.0,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               stream: bool = False, logprobs: bool = False,
                               top_logprobs: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, logit_bias: dict | None = None,
                               response_format: dict | None = None, grammar=None, tools=None,
                               tool_choice=None, parallel_tool_calls: bool | None = None):
        """OpenAI's chat.completion dict (or chat.completion.chunk iterator), via the model's
        template. logprobs=True reports each token's log-probability, top_logprobs=N the N
        likeliest tokens at each position too. response_format {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": ...}}, or grammar (GBNF text or a
        LlamaGrammar), keeps every token inside it. tools / tool_choice ("none", "auto",
        "required", {"type": "function", "function": {"name": ...}}) as OpenAI's (see tools.py):
        a reply of calls has content None, tool_calls, and finish_reason "tool_calls"."""
        if not isinstance(logprobs, bool):
            raise TorchlessError(f"logprobs must be True or False for a chat, got {logprobs!r}")
        top = _top_count(top_logprobs, "top_logprobs")
        if top is not None and not logprobs:
            raise TorchlessError("top_logprobs needs logprobs=True")
        tools = tool_request(tools, tool_choice, parallel_tool_calls)
        calling = tools is not None and tools.calls_tools
        if sum(x is not None for x in (response_format, grammar)) + calling > 1:
            raise TorchlessError("give at most one of response_format, grammar and tools (with a "
                                 "tool_choice other than 'none')")
        ids = self._prompt_ids(self._render_chat(messages, tools), template=True)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repeat_penalty=repeat_penalty, seed=seed, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        n_vocab, trigger = self.config.vocab_size, None
        if calling:
            compiled, trigger = tools.grammar(self.tokenizer, n_vocab)
        elif grammar is not None:
            compiled = user_grammar(grammar, self.tokenizer, n_vocab)
        else:
            compiled = response_format_grammar(response_format, self.tokenizer, n_vocab)
        seq = self._sequence(ids, 0, sampling, max_tokens, stop, (top or 0) if logprobs else None,
                             grammar=compiled, trigger=trigger)
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_path)
        if stream:
            return self._chat_chunks(seq, meta, ToolCallStream(tools) if calling else None)
        text, reason, usage, content = "", None, _usage(len(ids), 0), []
        for chunk in self._chat_chunks(seq, meta):
            choice = chunk["choices"][0]
            text += choice["delta"].get("content", "")
            reason, usage = choice["finish_reason"] or reason, chunk.get("usage", usage)
            content += (choice["logprobs"] or {}).get("content", [])
        message, reason = reply_message(text, reason, tools)
        return dict(meta, object="chat.completion",
                    choices=[dict(index=0, message=message,
                                  logprobs=dict(content=content, refusal=None) if logprobs else None,
                                  finish_reason=reason)],
                    usage=usage)

    # -- internals ---------------------------------------------------------------------------

    def sampling_params(self, **settings) -> SamplingParams:
        """SamplingParams, with logit_bias checked against this model's vocabulary."""
        params = SamplingParams(**settings)
        if params.logit_bias and params.logit_bias[-1][0] >= self.config.vocab_size:
            raise TorchlessError(f"logit_bias names token {params.logit_bias[-1][0]}, outside the "
                                 f"vocabulary (0..{self.config.vocab_size - 1})")
        return params

    def _sequence(self, ids, index, sampling: dict, max_tokens, stop, logprobs=None,
                  echo=False, grammar=None, trigger=None) -> Sequence:
        """grammar: a compiled llguidance grammar the sampler is kept inside (from `trigger`
        on, if one is given)."""
        params = self.sampling_params(**sampling)
        # Without a per-call seed, calls share the LLM's generator, so seed=... on LLM makes a
        # whole session reproducible (llama-cpp-python's behaviour).
        sampler = Sampler(params, rng=self._rng if params.seed is None else None)
        sampler = constrain(sampler, self.tokenizer, self.config.vocab_size, grammar, trigger)
        budget = self.n_ctx - len(ids)
        if max_tokens is not None and max_tokens > 0:
            budget = min(budget, max_tokens)
        return Sequence(ids, sampler, budget, self.tokenizer.eos_ids,
                        self.tokenizer.stream_decoder(), stop, index,
                        logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)

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

    def _render_chat(self, messages, tools=None) -> str:
        """The prompt of a chat; tools: a ToolRequest (tools.chat_with_tools says how they and
        tool turns reach the template)."""
        template = self.tokenizer.chat_template
        turns, extra = chat_with_tools(chat_messages(messages), tools, "tools" in template_variables(template))
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, **extra)

    def _check_not_served(self) -> None:
        if self.engine.served_by is not None:
            raise TorchlessError("this LLM is serving HTTP requests (create_app): a direct call "
                                 "would step its engine beside the server's thread; use another LLM")

    def _events(self, seqs: list[Sequence]):
        """Run the engine until every sequence of this call has finished; yield their events.
        A newer call ends this one: its unfinished sequences are cancelled."""
        self._check_not_served()
        if not self.runner.is_driver:  # another rank schedules: run its steps until the call ends
            self.runner.follow()
            return
        if not all(seq.finished for seq in self._active):
            # a stream left unfinished: it ends here, on every rank (their calls stay paired)
            for seq in self._active:
                self.engine.cancel(seq)
            while self.engine.has_work():
                self.engine.step()
            self.runner.end_call()
        self._request += 1
        request, self._active = self._request, seqs
        for seq in seqs:
            self.engine.add(seq)
        try:
            while True:
                if any(seq.finish_reason == "cancelled" for seq in seqs):
                    raise TorchlessError("this stream was interrupted: a newer request reused the model")
                if all(seq.finished for seq in seqs):
                    break
                for event in self.engine.step():
                    if event.finish_reason == "error":
                        raise TorchlessError(event.error)
                    if event.seq in seqs:
                        yield event
        finally:
            if request == self._request:
                for seq in seqs:
                    self.engine.cancel(seq)
                while self.engine.has_work():  # micro-batches still in a pipeline
                    self.engine.step()
                self.runner.end_call()

    def _completion_chunks(self, seqs, meta, prompts: list[str], echo: bool = False):
        """text_completion chunks, each naming its choice by index, as tokens come. With echo, a
        choice's first chunk is its prompt."""
        sent = {seq.seq_id: 0 for seq in seqs}  # logprob entries already in a chunk

        def logprobs(seq, head=None):
            if seq.logprobs is None:
                return None
            new, sent[seq.seq_id] = seq.token_logprobs[sent[seq.seq_id]:], len(seq.token_logprobs)
            base = len(prompts[seq.index])
            if head is None:
                return completion_logprobs(self.tokenizer, new, base)
            return completion_logprobs(self.tokenizer, new, base, head,
                                       prompt_offsets(self.tokenizer, seq.prompt_ids))

        if echo and self.runner.is_driver:
            for seq in seqs:
                yield dict(meta, choices=[dict(text=prompts[seq.index], index=seq.index,
                                               logprobs=logprobs(seq, seq.prompt_logprobs or []),
                                               finish_reason=None)])
        for event in self._events(seqs):
            seq = event.seq
            if event.finish_reason is not None:
                yield dict(meta, choices=[dict(text=event.text, index=seq.index, logprobs=logprobs(seq),
                                               finish_reason=event.finish_reason)],
                           usage=_usage(len(seq.prompt_ids), seq.completion_tokens))
            elif event.text or (seq.logprobs is not None and len(seq.token_logprobs) > sent[seq.seq_id]):
                yield dict(meta, choices=[dict(text=event.text, index=seq.index, logprobs=logprobs(seq),
                                               finish_reason=None)])

    def _chat_chunks(self, seq, meta, calls: ToolCallStream | None = None):
        """chat.completion.chunk dicts; with `calls`, the text goes through it (tool-call deltas)."""
        meta = dict(meta, object="chat.completion.chunk")
        sent = 0

        def logprobs():
            nonlocal sent
            if seq.logprobs is None:
                return None
            new, sent = seq.token_logprobs[sent:], len(seq.token_logprobs)
            return dict(content=chat_logprobs(self.tokenizer, new), refusal=None)

        if self.runner.is_driver:
            yield dict(meta, choices=[dict(index=0, delta=dict(role="assistant"), logprobs=None,
                                           finish_reason=None)])
        for event in self._events([seq]):
            reason = event.finish_reason
            if calls is not None:
                deltas, reason = calls.step(event.text, reason)
                for delta in deltas:
                    yield dict(meta, choices=[dict(index=0, delta=delta, logprobs=logprobs(), finish_reason=None)])
            elif event.text or (seq.logprobs is not None and len(seq.token_logprobs) > sent):
                yield dict(meta, choices=[dict(index=0, delta=dict(content=event.text), logprobs=logprobs(),
                                               finish_reason=None)])
            if reason is not None:
                yield dict(meta, choices=[dict(index=0, delta={}, logprobs=None, finish_reason=reason)],
                           usage=_usage(len(seq.prompt_ids), seq.completion_tokens))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


def _is_batch(prompt) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, (str, bytes, list, tuple)) for p in prompt)


def _top_count(value, name: str) -> int | None:
    """A logprobs / top_logprobs count: None (off) or an integer in 0..20."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise TorchlessError(f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got {value!r}")
    return value


def chat_messages(messages) -> list[dict]:
    """OpenAI's messages as the chat template takes them: `content` given as a list of text
    parts is joined; an assistant turn may have null content with `tool_calls`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TorchlessError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TorchlessError(f"each message needs a string 'role' and 'content', got {m!r}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise TorchlessError(f"messages[{i}].content: parts of type {kind!r} are not "
                                         "supported yet (only 'text')")
                if not isinstance(part.get("text"), str):
                    raise TorchlessError(f"messages[{i}].content: a text part needs a string 'text'")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""  # templates that know tool_calls read them; others see an empty turn
        elif not isinstance(content, str):
            raise TorchlessError(f"each message needs a string 'role' and 'content', got {m!r}")
        out.append(dict(m, content=content))
    return out


def _merge_chunks(chunks, meta, n: int) -> dict:
    """The non-streamed text_completion of a batch: its chunks joined per choice."""
    texts, reasons, usage, logprobs = [""] * n, [None] * n, [None] * n, [[] for _ in range(n)]
    for chunk in chunks:
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["text"]
        logprobs[choice["index"]].append(choice["logprobs"])
        if choice["finish_reason"] is not None:
            reasons[choice["index"]], usage[choice["index"]] = choice["finish_reason"], chunk["usage"]
    # (a later stage of an MPI pipeline gets no chunks: its result is empty; rank 0 has the text)
    total = {k: sum((u or {}).get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return dict(meta, choices=[dict(text=t, index=i, logprobs=merge_completion_logprobs(lp), finish_reason=r)
                               for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))], usage=total)
