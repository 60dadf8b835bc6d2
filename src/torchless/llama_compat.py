"""`Llama`: llama-cpp-python's `llama_cpp.Llama` API over this engine, for code written against it.

Same constructor arguments, methods, defaults and result shapes (its sampling defaults:
temperature 0.8, top_k 40, top_p 0.95, min_p 0.05; `cmpl-` / `chatcmpl-` ids; streams whose
last chunk carries only the finish reason and no usage). Completions and chats run on `LLM`'s
engine; `eval` / `sample` / `generate` / `scores` run the one-sequence loop on a state of their
own. An argument this engine cannot honour raises one line; one that only places work on a GPU
is ignored, and verbose mode says so.

Known differences: after `create_completion`, `n_tokens` / `scores` still describe the last
`eval` (llama-cpp-python leaves the completion's tokens there); `scores` has n_ctx rows with or
without `logits_all` (without it only the last evaluated token's row is written, where
llama-cpp-python keeps n_batch rows and writes none); chat `logprobs=True` without
`top_logprobs` still reports each token's log-probability; `embed` pools by the mean when the
file names no pooling (llama.cpp gives one vector per token there) and `create_embedding`
returns unit-length vectors, as OpenAI's and llama-server's embeddings are.
"""

from __future__ import annotations

import inspect
import sys
from typing import Iterator

import numpy as np

from .api import LLM, chat_messages
from .chat_template import render_chat_template
from .engine.engine import PREFIX_CACHE_BYTES
from .errors import TorchlessError
from .grammar import LlamaGrammar  # noqa: F401 - llama_cpp.LlamaGrammar's place here
from .kernels.workdist import numba_threads
from .sampling import Sampler, SamplingParams
from .tools import chat_with_tools

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "a random seed"
POOLING_UNSPECIFIED, POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST = -1, 0, 1, 2, 3
_POOLING_NAMES = {POOLING_NONE: "none", POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}
CHAT_FORMATS = (None, "chat_template.default", "chatml")

# Constructor arguments that place work or memory on a GPU, or only tune speed: any value is
# accepted, and verbose mode says once that it does nothing here.
_NO_EFFECT = {"n_gpu_layers": 0, "split_mode": 1, "main_gpu": 0, "tensor_split": None,
              "use_mmap": True, "use_mlock": False, "n_ubatch": 512, "n_threads_batch": None,
              "offload_kqv": True, "flash_attn": False, "op_offload": None, "swa_full": None,
              "no_perf": False, "numa": False}
# Constructor arguments that would change results: only their default is accepted.
_DEFAULT_ONLY = {"vocab_only": False, "kv_overrides": None, "rope_scaling_type": -1,
                 "attention_type": -1, "rope_freq_base": 0.0, "rope_freq_scale": 0.0,
                 "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0,
                 "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0, "last_n_tokens_size": 64,
                 "lora_base": None, "lora_scale": 1.0, "lora_path": None, "chat_handler": None,
                 "draft_model": None, "tokenizer": None, "type_k": None, "type_v": None,
                 "spm_infill": False}
# Sampling arguments of llama.cpp's that this engine's sampler does not have.
_SAMPLING_DEFAULTS = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "suffix": None,
                      "stopping_criteria": None, "logits_processor": None, "grammar": None}


class LlamaRAMCache:
    """llama_cpp.LlamaRAMCache's place: `Llama.set_cache(LlamaRAMCache(capacity_bytes))` gives
    the engine's prefix cache (engine/prefix_cache.py) that budget. Like llama-cpp-python's, it
    keeps recent prompts' keys and values in memory, so a prompt that starts as one of them runs
    only from where it differs."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise TorchlessError(f"LlamaRAMCache: capacity_bytes must be an integer >= 0, "
                                 f"got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes


class EmbeddingModeError(TorchlessError, RuntimeError):
    """embed() on a Llama made without embedding=True (llama-cpp-python raises RuntimeError)."""


def _refuse_unless_default(given: dict, defaults: dict, where: str) -> None:
    for name, value in given.items():
        if name not in defaults:
            raise TorchlessError(f"{where}: unknown argument {name!r}")
        if value is not defaults[name] and value != defaults[name]:
            raise TorchlessError(f"{where}: {name}={value!r} is not supported by torchless "
                                 f"(only the default, {defaults[name]!r})")


class _ChatMLEngine(LLM):
    """An LLM whose chats use ChatML whatever the file's template (chat_format='chatml')."""

    def _render_chat(self, messages, tools=None) -> str:
        turns, extra = chat_with_tools(chat_messages(messages), tools, template_takes_tools=False)
        return render_chat_template(None, turns, bos_token=self.tokenizer.bos_token,
                                    eos_token=self.tokenizer.eos_token, **extra)


class Llama:
    """llama-cpp-python's `Llama` on torchless.

    >>> llm = Llama(model_path="model.gguf", n_ctx=2048, seed=0, verbose=False)
    >>> llm("Q: What is the capital of France? A:", max_tokens=16, stop=["Q:"])["choices"][0]["text"]
    """

    def __init__(self, model_path: str, *, seed: int = LLAMA_DEFAULT_SEED, n_ctx: int = 512,
                 n_batch: int = 512, n_threads: int | None = None,
                 pooling_type: int = POOLING_UNSPECIFIED, logits_all: bool = False,
                 embedding: bool = False, chat_format: str | None = None, verbose: bool = True,
                 **kwargs):
        unknown = [k for k in kwargs if k not in _NO_EFFECT and k not in _DEFAULT_ONLY]
        if unknown:
            raise TorchlessError(f"Llama: unknown argument {unknown[0]!r}")
        _refuse_unless_default({k: v for k, v in kwargs.items() if k in _DEFAULT_ONLY},
                               _DEFAULT_ONLY, "Llama")
        if chat_format not in CHAT_FORMATS:
            raise TorchlessError(f"Llama: chat_format={chat_format!r} is not supported by torchless "
                                 "(None or 'chat_template.default': the file's template; 'chatml')")
        if pooling_type not in (POOLING_UNSPECIFIED, *_POOLING_NAMES):
            raise TorchlessError(f"Llama: pooling_type={pooling_type!r} is not supported by torchless "
                                 "(-1 unspecified, 0 none, 1 mean, 2 cls, 3 last)")
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise TorchlessError(f"Llama: n_batch must be a positive integer, got {n_batch!r}")
        self.n_threads = _thread_count(n_threads, verbose)
        engine = _ChatMLEngine if chat_format == "chatml" else LLM
        random = seed in (LLAMA_DEFAULT_SEED, -1)
        self._llm = engine(model_path, n_ctx=n_ctx, seed=None if random else seed, verbose=verbose)
        self.model_path, self.verbose, self.chat_format = model_path, verbose, chat_format
        self._seed = seed
        self.n_batch = min(n_batch, self._llm.n_ctx)
        self._llm.engine.scheduler.chunk_size = self.n_batch  # prompt chunks, as llama.cpp's batch
        self._logits_all, self._embedding = logits_all, embedding
        self.metadata = {str(k): str(v) for k, v in self._llm.params.metadata.items()
                         if not isinstance(v, (list, tuple, np.ndarray))}
        file_pooling = self.metadata.get(f"{self._llm.config.architecture}.pooling_type")
        self._pooling = (pooling_type if pooling_type != POOLING_UNSPECIFIED
                         else int(file_pooling) if file_pooling is not None else POOLING_MEAN)
        ignored = {k: v for k, v in kwargs.items() if k in _NO_EFFECT and v != _NO_EFFECT[k]}
        if verbose and ignored:
            print(f"torchless runs on the CPU, with its own memory map and threads: "
                  f"{', '.join(f'{k}={v!r}' for k, v in ignored.items())} ignored", file=sys.stderr)
        n_ctx_, n_vocab = self._llm.n_ctx, self._llm.config.vocab_size
        self.n_tokens = 0
        self.input_ids = np.zeros(n_ctx_, np.intc)                 # (n_ctx,)
        self.scores = np.zeros((n_ctx_, n_vocab), np.single)     # (n_ctx, n_vocab), pages on use
        self._logits = np.zeros(n_vocab, np.single)               # the last evaluated token's
        self._state = None
        self.cache: LlamaRAMCache | None = None  # set_cache's

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, additional_files=None,
                        local_dir=None, local_dir_use_symlinks="auto", cache_dir=None,
                        **kwargs) -> "Llama":
        """A GGUF file of a Hugging Face repository, fetched into the Hub cache."""
        from . import hub

        _refuse_unless_default(dict(additional_files=additional_files, local_dir=local_dir,
                                    cache_dir=cache_dir), dict(additional_files=None, local_dir=None,
                                                               cache_dir=None), "from_pretrained")
        if not hasattr(hub, "parse_hub_ref"):
            raise TorchlessError("Llama.from_pretrained needs Hugging Face Hub support (torchless.hub)")
        ref = repo_id if filename is None else f"{repo_id}:{filename}"
        return cls(model_path=str(hub.resolve_model(ref)), **kwargs)

    # -- the model ---------------------------------------------------------------------------

    def n_ctx(self) -> int:
        return self._llm.n_ctx

    def n_vocab(self) -> int:
        return self._llm.config.vocab_size

    def n_embd(self) -> int:
        return self._llm.config.hidden_size

    def token_bos(self) -> int:
        return -1 if self._llm.tokenizer.bos_id is None else self._llm.tokenizer.bos_id

    def token_eos(self) -> int:
        return -1 if self._llm.tokenizer.eos_id is None else self._llm.tokenizer.eos_id

    def pooling_type(self) -> int:
        return self._pooling

    def set_seed(self, seed: int) -> None:
        self._llm._rng = Sampler(SamplingParams(seed=seed)).rng

    def close(self) -> None:
        self._llm.close()

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of UTF-8 `text`. add_bos adds the model's BOS if its file asks for one (as
        llama.cpp's add_special); special=False reads control tokens as plain text."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        return self._llm.tokenizer.encode(text, add_bos=None if add_bos else False, special=special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        """The bytes of `tokens`; control tokens are left out unless special=True. (prev_tokens
        is accepted and, as in llama-cpp-python, unused.)"""
        tok, ids = self._llm.tokenizer, [int(t) for t in tokens]
        out = b"".join(tok.token_bytes(t) for t in ids if special or not tok.is_special(t))
        return out[1:] if ids and ids[0] == self.token_bos() and out[:1] == b" " else out

    # -- the low-level loop ------------------------------------------------------------------

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[:self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[:self.n_tokens, :]

    def reset(self) -> None:
        self.n_tokens = 0

    def set_cache(self, cache: LlamaRAMCache | None) -> None:
        """A LlamaRAMCache: the prefix cache gets its capacity. None: the default budget (where
        llama-cpp-python without a cache still reuses the prompt its context holds)."""
        if cache is None:
            budget = PREFIX_CACHE_BYTES
        elif type(cache).__name__ == "LlamaRAMCache" and hasattr(cache, "capacity_bytes"):
            budget = int(cache.capacity_bytes)
        else:
            raise TorchlessError(f"Llama.set_cache: torchless keeps prompts in memory only "
                                 f"(LlamaRAMCache or None), got {type(cache).__name__}")
        self._llm.engine.prefix_cache.set_budget(budget)
        self.cache = cache

    def eval(self, tokens) -> None:
        """Run `tokens` after the first n_tokens ones (what was evaluated past them is
        forgotten), n_batch at a time; their logits go to `scores`."""
        tokens = [int(t) for t in tokens]
        if self.n_tokens + len(tokens) > self.n_ctx():
            raise TorchlessError(f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context "
                                 f"window of {self.n_ctx()}")
        if not tokens:
            return
        if self._state is None:
            self._state = self._llm.model.new_state(self.n_ctx())
        self._state.cache.pos = self.n_tokens  # keys past n_tokens are overwritten
        with numba_threads(self.n_threads):
            logits = self._llm.model.prefill(self._state, tokens, self.n_batch, all_logits=self._logits_all)
        start, self.n_tokens = self.n_tokens, self.n_tokens + len(tokens)
        self.input_ids[start:self.n_tokens] = tokens
        self._logits[:] = logits[-1] if self._logits_all else logits
        if self._logits_all:
            self.scores[start:self.n_tokens] = logits
        else:
            self.scores[self.n_tokens - 1] = self._logits

    def _sampler(self, temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, logits_processor=None, **rest):
        _refuse_unless_default({k: v for k, v in rest.items() if k not in ("mirostat_eta",
                                "mirostat_tau", "penalize_nl")}, _SAMPLING_DEFAULTS, "sample")
        sampler = Sampler(self._llm.sampling_params(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty),
            rng=self._llm._rng)

        def pick(logits: np.ndarray, n_prompt: int) -> int:
            history = self._input_ids
            for process in logits_processor or ():
                logits = process(history, logits)
            return sampler(logits, history.tolist(), n_prompt)
        return pick

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
               typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
               mirostat_mode: int = 0, mirostat_eta: float = 0.1, mirostat_tau: float = 5.0,
               penalize_nl: bool = True, logits_processor=None, grammar=None,
               idx: int | None = None) -> int:
        """A token from the logits of the last evaluated token (or of position idx, which
        needs logits_all unless it is the last)."""
        pick = self._sampler(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                             presence_penalty, logits_processor, typical_p=typical_p, tfs_z=tfs_z,
                             mirostat_mode=mirostat_mode, grammar=grammar)
        if self.n_tokens == 0:
            raise TorchlessError("sample: nothing has been evaluated (call eval first)")
        return pick(self._row(idx), self.n_tokens)

    def _row(self, idx: int | None) -> np.ndarray:
        if idx is None or idx == self.n_tokens - 1:
            return self._logits.copy()
        if not self._logits_all or not 0 <= idx < self.n_tokens:
            raise TorchlessError(f"sample: no logits kept for position {idx} (logits_all=True "
                                 f"keeps every evaluated one; {self.n_tokens} evaluated)")
        return self.scores[idx].copy()

    def generate(self, tokens, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0,
                 reset: bool = True, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                 mirostat_eta: float = 0.1, penalize_nl: bool = True, logits_processor=None,
                 stopping_criteria=None, grammar=None) -> Iterator[int]:
        """Token ids, without end: evaluate `tokens` (reusing the evaluated prefix they share),
        sample, evaluate the sample, ... A value sent into the generator is evaluated after
        the token just yielded."""
        pick = self._sampler(temp, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                             presence_penalty, logits_processor, typical_p=typical_p, tfs_z=tfs_z,
                             mirostat_mode=mirostat_mode, grammar=grammar)
        tokens = [int(t) for t in tokens]
        if reset:  # keep the evaluated prefix; its last token is run again for its logits
            shared = max(0, min(self.longest_token_prefix(self._input_ids, tokens), len(tokens) - 1))
            self.n_tokens, tokens = shared, tokens[shared:]
        n_prompt = self.n_tokens + len(tokens)
        while True:
            self.eval(tokens)
            token = pick(self._logits.copy(), n_prompt)
            if stopping_criteria is not None and stopping_criteria(self._input_ids, self._logits):
                return
            sent = yield token
            tokens = [token, *(sent or ())]

    # -- completions -------------------------------------------------------------------------

    def create_completion(self, prompt, suffix=None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          typical_p: float = 1.0, logprobs: int | None = None, echo: bool = False,
                          stop=None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False,
                          seed: int | None = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                          mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: str | None = None, stopping_criteria=None, logits_processor=None,
                          grammar=None, logit_bias: dict | None = None):
        """A text_completion dict, or with stream=True an iterator of its chunks (the last
        one: empty text and the finish reason; usage only in the dict)."""
        _refuse_unless_default(dict(suffix=suffix, typical_p=typical_p, tfs_z=tfs_z,
                                    mirostat_mode=mirostat_mode, stopping_criteria=stopping_criteria,
                                    logits_processor=logits_processor),
                               _SAMPLING_DEFAULTS, "create_completion")
        if logprobs is not None and not self._logits_all:
            raise TorchlessError("logprobs is not supported for models created with logits_all=False")
        with numba_threads(self.n_threads):  # a stream only checks its arguments here
            out = self._llm.create_completion(
                prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                min_p=min_p, repeat_penalty=repeat_penalty, stop=stop or None, seed=seed,
                stream=stream, logprobs=logprobs, echo=echo, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, logit_bias=logit_bias, grammar=grammar)
        name = model if model is not None else self.model_path
        if not stream:
            return dict(out, model=name)
        return _completion_stream(_steps_at(self.n_threads, out), name)

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], functions=None, function_call=None,
                               tools=None, tool_choice=None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               typical_p: float = 1.0, stream: bool = False, stop=None,
                               seed: int | None = None, response_format=None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                               mirostat_eta: float = 0.1, model: str | None = None,
                               logits_processor=None, grammar=None, logit_bias: dict | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None):
        """A chat.completion dict through the model's chat template, or with stream=True an
        iterator of chat.completion.chunk dicts (role first, finish reason last, no usage)."""
        _refuse_unless_default(dict(typical_p=typical_p, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                                    logits_processor=logits_processor), _SAMPLING_DEFAULTS,
                               "create_chat_completion")
        extra = dict(functions=functions, function_call=function_call, tools=tools,
                     tool_choice=tool_choice, response_format=response_format, grammar=grammar)
        accepted = inspect.signature(self._llm.create_chat_completion).parameters
        for name, value in list(extra.items()):
            if value is None:
                del extra[name]
            elif name not in accepted:
                raise TorchlessError(f"create_chat_completion: {name} is not supported by torchless yet")
        if logprobs and not self._logits_all:
            raise TorchlessError("logprobs is not supported for models created with logits_all=False")
        with numba_threads(self.n_threads):
            out = self._llm.create_chat_completion(
                messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                min_p=min_p, repeat_penalty=repeat_penalty, stop=stop or None, seed=seed, stream=stream,
                logprobs=bool(logprobs), top_logprobs=top_logprobs if logprobs else None,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                logit_bias=logit_bias, **extra)
        name = model if model is not None else self.model_path
        if not stream:
            return dict(out, model=name)
        return ({k: v for k, v in dict(chunk, model=name).items() if k != "usage"}
                for chunk in _steps_at(self.n_threads, out))

    # -- embeddings --------------------------------------------------------------------------

    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """The pooled (pooling_type) final hidden states of each text: one vector per text, or
        with pooling none one per token; a list of them for a list of texts."""
        if not self._embedding:
            raise EmbeddingModeError("Llama model must be created with embedding=True to call this method")
        texts, vectors, total = [input] if isinstance(input, str) else list(input), [], 0
        for text in texts:
            ids = self.tokenize(text.encode("utf-8"))
            ids = ids[:self.n_batch] if truncate else ids
            if len(ids) > self.n_batch:
                raise TorchlessError(f"Requested tokens ({len(ids)}) exceed batch size of {self.n_batch}")
            if not ids:
                raise TorchlessError("cannot embed a text of no tokens")
            total += len(ids)
            model = self._llm.model
            with numba_threads(self.n_threads):
                hidden = model.hidden_states(model.new_state(len(ids)), ids, self.n_batch)  # (T, hidden)
            rows = {POOLING_NONE: hidden, POOLING_MEAN: hidden.mean(0, keepdims=True),
                    POOLING_CLS: hidden[:1], POOLING_LAST: hidden[-1:]}[self._pooling]
            if normalize:
                norms = np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
                rows = rows / np.where(norms > 0, norms, 1.0)
            rows = rows.astype(np.float64).tolist()
            vectors.append(rows if self._pooling == POOLING_NONE else rows[0])
        out = vectors[0] if isinstance(input, str) else vectors
        return (out, total) if return_count else out

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict:
        """OpenAI's embeddings list: a unit-length vector per input."""
        vectors, total = self.embed(input, normalize=True, return_count=True)
        vectors = [vectors] if isinstance(input, str) else vectors
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        logits = np.asarray(logits, np.single)
        top = logits.max(axis=axis, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=axis, keepdims=True))

    @staticmethod
    def longest_token_prefix(a, b) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _thread_count(n_threads, verbose: bool) -> int:
    """n_threads as numba can run it: None or 0 (llama-cpp-python's default either way) is the
    calling thread's count (all the cores this process may use, unless set); more than numba's
    pool is cut to the pool, and verbose mode says so."""
    import numba

    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, type(None))) or (n_threads or 0) < 0:
        raise TorchlessError(f"Llama: n_threads must be a positive integer (0 or None: all the "
                             f"cores), got {n_threads!r}")
    if not n_threads:
        return numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS
    if n_threads > most and verbose:
        print(f"torchless: n_threads={n_threads} is more than numba's {most} threads "
              f"(NUMBA_NUM_THREADS): {most} used", file=sys.stderr)
    return min(n_threads, most)


def _steps_at(n_threads: int, chunks):
    """A stream whose every step runs at n_threads on whichever thread takes it."""
    try:
        while True:
            with numba_threads(n_threads):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        chunks.close()


def _completion_stream(chunks, model: str):
    """LLM's text_completion chunks in llama-cpp-python's shape: no usage, and the finish
    reason alone in a last chunk of empty text."""
    for chunk in chunks:
        chunk = {k: v for k, v in dict(chunk, model=model).items() if k != "usage"}
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None and (choice["text"] or choice["logprobs"]):
            yield dict(chunk, choices=[dict(choice, finish_reason=None)])
            chunk = dict(chunk, choices=[dict(choice, text="", logprobs=None)])
        yield chunk
