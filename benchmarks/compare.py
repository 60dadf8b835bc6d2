"""torchless against llama.cpp (through llama-cpp-python) on the same GGUF file.

Single-sequence mode (the default). Workload of one run: a --prompt-tokens prefill (default 256) followed by --gen-tokens greedy
decode steps (default 128), on the same prompt ids for both engines (seeded random ids over the
vocabulary, skipping the first 20 ids where the special tokens live).

Each engine runs in its own subprocess (this script re-invoked with --engine ... --json), so peak
RSS (getrusage maxrss) is per engine. Subprocesses alternate t, l, t, l, ... and each does one
warm-up run before the measured one, so slow spells on a shared machine hit both engines alike.
Reported: per engine the median prefill tok/s, decode tok/s and peak RSS; then the ratios
torchless / llama.cpp, min / median / max over the paired runs (for RSS, the ratio of medians).
Not part of CI.

    python benchmarks/compare.py [-m PATH] [--runs 5] [--threads 2 | --threads 1,2]
                                 [--prompt-tokens 256] [--gen-tokens 128]

Batched mode (--batch 1,8,16): for each batch size B, B short distinct English prompts (8-16
tokens, tokenized once with torchless's tokenizer; the same ids go to both engines), each
decoded greedily for --gen-tokens tokens (default 64 here) or until end of sequence, all B as
one batch. torchless: one `LLM.create_completion([ids_1, ..., ids_B], max_tokens=T,
temperature=0)` call. llama.cpp: its low-level API (one context with n_seq_max = B, one
sequence id per prompt; one llama_decode of all the prompts, then one llama_decode per step
with one token per unfinished sequence; greedy argmax of each sequence's logits in Python).
Reported per (threads, B): total generated tok/s (completion tokens of the whole batch / wall
time of the whole generation, prefill included; after one warm-up of the same batch), medians
and ranges over the --runs alternating subprocess pairs, the ratios torchless / llama.cpp and
torchless / its own B=1 figure, and per sequence how many leading greedy tokens agree.

    python benchmarks/compare.py --batch 1,8,16 [--threads 1,2] [--runs 3] [--gen-tokens 64]

llama-cpp-python is used from the current python if it imports; otherwise from a separate venv
(~/.cache/torchless/bench-venv, made with --system-site-packages), which is created and
`pip install llama-cpp-python`'d on first use: a source build, about 11 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV = Path.home() / ".cache" / "torchless" / "bench-venv"
# `import torchless` sets GOMP_SPINCOUNT (see torchless._spin_briefly) in this process too, which
# would reach llama.cpp's subprocess, whose ggml also runs on libgomp: each engine gets the
# environment as the user gave it, and chooses for itself.
USER_SPIN_COUNT = os.environ.get("GOMP_SPINCOUNT")
FIRST_ID = 20  # prompt ids start here: below it are the special tokens of the usual vocabularies


# -- the engines (run in subprocesses) -----------------------------------------------------------

def prompt_ids(vocab_size: int, n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(FIRST_ID, vocab_size, n).tolist()


def limit_threads(n: int) -> None:
    """Before numpy loads: BLAS / OpenMP pools of n threads (threadpoolctl again after import)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux: KiB


def run_torchless(args) -> dict:
    import numba
    import numpy as np

    import torchless  # noqa: F401 - before numba starts its threads: see torchless._spin_briefly

    numba.set_num_threads(args.threads)
    from torchless import InferenceState, Mistral, Parameters

    t0 = time.perf_counter()
    model = Mistral.load(Parameters.load(args.model))
    load_s = time.perf_counter() - t0
    try:  # after torchless is loaded: pools its imports brought in are limited too
        from threadpoolctl import threadpool_limits
        blas_limit = threadpool_limits(limits=args.threads)  # kept alive for the whole process
    except ImportError:
        blas_limit = None
    P, G = args.prompt_tokens, args.gen_tokens
    prompt = prompt_ids(model.config.vocab_size, P, args.seed)
    state = InferenceState(model.config, max_seq_len=P + G + 1)

    def one_run():
        state.reset()
        t0 = time.perf_counter()
        model.prefill(state, prompt)
        t1 = time.perf_counter()
        out = []
        for _ in range(G):
            tok = int(np.argmax(state.logits))
            out.append(tok)
            model.fast_forward(state, tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    return measure(args, one_run, load_s, model.config.vocab_size, prompt, {
        "engine": "torchless", "version": _torchless_version(),
        "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
        "blas": _blas_info(blas_limit)})


def run_llamacpp(args) -> dict:
    import numpy as np
    import llama_cpp

    P, G = args.prompt_tokens, args.gen_tokens
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=P + G + 16, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prompt = prompt_ids(n_vocab, P, args.seed)

    def last_logits():
        # Llama.eval no longer copies logits into llm.scores unless logits_all (0.3.x): read the
        # last token's row straight from the context, as llama.cpp's own samplers do.
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def one_run():
        # Llama.eval: llama_decode of the tokens in n_batch batches after n_tokens, logits for
        # the last one only. reset() sets n_tokens = 0 (eval then drops the stale KV entries).
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for _ in range(G):
            tok = int(np.argmax(last_logits()))
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    return measure(args, one_run, load_s, llm.n_vocab(), prompt, {
        "engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}",
        "system_info": _llama_system_info(llama_cpp)})


def measure(args, one_run, load_s, vocab_size, prompt, info) -> dict:
    one_run()  # warm-up: compilation, page faults, allocator pools
    prefill, decode, tokens = [], [], None
    for _ in range(args.inner_runs):
        tp, td, tokens = one_run()
        prefill.append(args.prompt_tokens / tp)
        decode.append(args.gen_tokens / td)
    return {**info, "threads": args.threads, "load_s": load_s, "vocab_size": vocab_size,
            "prompt_head": prompt[:8], "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "peak_rss_mb": peak_rss_mb(),
            "tokens": tokens}


# -- batched decoding (--batch) ------------------------------------------------------------------

# Short, distinct prompts (8 to 16 SmolLM2 tokens each); a batch of B takes the first B (past the
# end of the list, the list again with a numbered prefix, so that every prompt stays distinct).
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "Name the three primary colors and explain why they are called primary:",
    "The autumn rain fell on the city all night, and in the morning the streets",
    "The best way to learn a new language as an adult is",
    "At sea level, pure water boils at a temperature of",
    "In computer science, a linked list is a data structure that",
    "My favourite breakfast is eggs with toast because",
    "The largest planet in our solar system is called",
    "Here is a recipe for a simple tomato soup:",
    "The history of the Roman Empire began when",
    "To train a puppy to sit, you should first",
    "The main difference between a virus and a bacterium is",
    "Photosynthesis is the process by which green plants",
    "A good night's sleep helps the human brain to",
    "The first person to walk on the moon was",
    "Question: what is the capital of France? Answer: the capital of France is",
]


def batch_prompts(model: Path, n: int) -> dict:
    """The prompt ids of the largest batch and the end-of-sequence ids, from torchless's
    tokenizer: computed once by the driver and handed to both engines."""
    from torchless.loader import Parameters

    tok = Parameters.load(model).tokenizer
    texts = [PROMPTS[i % len(PROMPTS)] if i < len(PROMPTS)
             else f"{i // len(PROMPTS) + 1}. {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]
    return {"prompts": [tok.encode(t) for t in texts], "eos": sorted(tok.eos_ids)}


def run_torchless_batch(args) -> dict:
    import numba

    import torchless  # noqa: F401 - before numba starts its threads: see torchless._spin_briefly

    numba.set_num_threads(args.threads)
    from torchless import LLM

    work = json.loads(Path(args.work).read_text())
    t0 = time.perf_counter()
    # No prefix cache: the measured runs repeat the warm-up's prompts, which it would find kept,
    # and llama.cpp runs each batch from an empty cache.
    llm = LLM(str(args.model), prefix_cache_bytes=0)
    load_s = time.perf_counter() - t0
    try:  # after torchless is loaded: pools its imports brought in are limited too
        from threadpoolctl import threadpool_limits
        blas_limit = threadpool_limits(limits=args.threads)  # kept alive for the whole process
    except ImportError:
        blas_limit = None
    seqs = []  # the engine's Sequence objects of the current call: their token ids
    add = llm.engine.add
    llm.engine.add = lambda seq: seqs.append(seq) or add(seq)

    def one_run(prompts):
        seqs.clear()
        t0 = time.perf_counter()
        out = llm.create_completion(prompts, max_tokens=args.gen_tokens, temperature=0)
        wall = time.perf_counter() - t0
        tokens = [s.tokens[len(s.prompt_ids):] for s in sorted(seqs, key=lambda s: s.index)]
        n = out["usage"]["completion_tokens"]
        if n != sum(map(len, tokens)):
            raise RuntimeError(f"usage says {n} completion tokens, the sequences hold "
                               f"{sum(map(len, tokens))}")
        return wall, tokens

    return measure_batch(args, work, one_run, load_s, {
        "engine": "torchless", "version": _torchless_version(),
        "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
        "blas": _blas_info(blas_limit)})


def run_llamacpp_batch(args) -> dict:
    import numpy as np
    import llama_cpp as lc

    work = json.loads(Path(args.work).read_text())
    eos = set(work["eos"])
    lc.llama_backend_init()
    _quiet_llama_log(lc)
    t0 = time.perf_counter()
    model = lc.llama_model_load_from_file(str(args.model).encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {args.model}")
    load_s = time.perf_counter() - t0
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    settings = {}

    def one_run(prompts, ctx):
        B = len(prompts)
        total = sum(map(len, prompts))
        batch = lc.llama_batch_init(max(total, B), 0, 1)
        mem = lc.llama_get_memory(ctx)
        lc.llama_memory_clear(mem, True)
        try:
            t0 = time.perf_counter()
            # prefill: every prompt in one llama_decode, sequence id i; logits of its last token
            rows, k = [], 0
            for i, ids in enumerate(prompts):
                for j, tok in enumerate(ids):
                    _batch_set(batch, k, tok, j, i, j == len(ids) - 1)
                    k += 1
                rows.append(k - 1)
            batch.n_tokens = k
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (prefill)")
            tokens = [[] for _ in prompts]
            live = list(range(B))  # the sequences still generating, in the order of `rows`
            pos = [len(ids) for ids in prompts]
            while live:
                nxt = []
                for i, row in zip(live, rows):
                    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row),
                                                   shape=(n_vocab,))
                    tok = int(np.argmax(logits))
                    if tok in eos:
                        continue
                    tokens[i].append(tok)
                    if len(tokens[i]) < args.gen_tokens:
                        nxt.append((i, tok))
                if not nxt:
                    break
                # one decode step: one token per unfinished sequence, logits for each
                for k, (i, tok) in enumerate(nxt):
                    _batch_set(batch, k, tok, pos[i], i, True)
                    pos[i] += 1
                batch.n_tokens = len(nxt)
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed (decode step)")
                live, rows = [i for i, _ in nxt], list(range(len(nxt)))
            wall = time.perf_counter() - t0
        finally:
            lc.llama_batch_free(batch)
        return wall, tokens

    def new_context(B):
        longest = max(map(len, work["prompts"][:B]))
        p = lc.llama_context_default_params()
        p.n_seq_max = B
        p.n_ctx = B * (longest + args.gen_tokens + 16)  # without kv_unified: n_ctx / B per sequence
        p.n_batch = p.n_ubatch = max(512, sum(map(len, work["prompts"][:B])))
        p.n_threads = p.n_threads_batch = args.threads
        p.no_perf = True
        ctx = lc.llama_init_from_model(model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {B} sequences")
        settings.update(n_ctx=p.n_ctx, n_batch=p.n_batch, flash_attn_type=p.flash_attn_type,
                        kv_unified=bool(p.kv_unified), type_k=p.type_k)
        return ctx

    contexts = {}

    def run_b(prompts):
        B = len(prompts)
        if B not in contexts:
            for ctx in contexts.values():
                lc.llama_free(ctx)
            contexts.clear()
            contexts[B] = new_context(B)
        return one_run(prompts, contexts[B])

    result = measure_batch(args, work, run_b, load_s, {
        "engine": "llama.cpp", "version": f"llama-cpp-python {lc.__version__}",
        "system_info": _llama_system_info(lc)})
    result["settings"] = settings  # of the last context: n_ctx is that of the largest B
    for ctx in contexts.values():
        lc.llama_free(ctx)
    lc.llama_model_free(model)
    return result


def _batch_set(batch, k: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[k] = token
    batch.pos[k] = pos
    batch.n_seq_id[k] = 1
    batch.seq_id[k][0] = seq
    batch.logits[k] = logits


_KEEP = []  # ctypes callbacks handed to llama.cpp must outlive the calls


def _quiet_llama_log(lc) -> None:
    """llama.cpp logs every context it makes to stderr: a callback that drops it."""
    import ctypes

    cb = lc.llama_log_callback(lambda level, text, user_data: None)
    _KEEP.append(cb)
    lc.llama_log_set(cb, ctypes.c_void_p(0))


def measure_batch(args, work, one_run, load_s, info) -> dict:
    """Per batch size: one warm-up call, then --inner-runs measured ones (median wall time)."""
    per_b = {}
    for B in args.batch:
        prompts = work["prompts"][:B]
        one_run(prompts)  # warm-up: compilation, page faults, allocator pools
        walls, tokens = [], None
        for _ in range(args.inner_runs):
            wall, tokens = one_run(prompts)
            walls.append(wall)
        wall = statistics.median(walls)
        n = sum(map(len, tokens))
        per_b[str(B)] = {"wall_s": wall, "gen_tokens": n, "tok_s": n / wall, "tokens": tokens}
    return {**info, "threads": args.threads, "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
            "batch": per_b}


def _torchless_version() -> str:
    from importlib.metadata import version

    v = f"torchless {version('torchless')}"
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno", "src"],
                               capture_output=True, text=True).stdout.strip()
        v += f" (git {rev}{', src/ has uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return v


def _blas_info(limit) -> str:
    if limit is None:
        return "threadpoolctl not installed; BLAS threads limited through environment variables"
    try:
        from threadpoolctl import threadpool_info
        return ", ".join(f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')}"
                         for p in threadpool_info()) or "none found"
    except Exception as e:  # informational only
        return f"? ({e})"


def _llama_system_info(llama_cpp) -> str:
    try:
        s = llama_cpp.llama_print_system_info()
        return (s.decode() if isinstance(s, bytes) else str(s)).strip()
    except Exception as e:  # informational only
        return f"? ({e})"


# -- the driver ----------------------------------------------------------------------------------

def machine() -> str:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except OSError:
        pass
    cores = fields.get("Core(s) per socket"), fields.get("Socket(s)")
    physical = int(cores[0]) * int(cores[1]) if all(c and c.isdigit() for c in cores) else "?"
    return (f"{fields.get('Model name', '?')}; {fields.get('CPU(s)', os.cpu_count())} logical CPUs, "
            f"{physical} cores, {fields.get('Thread(s) per core', '?')} thread(s) per core; "
            f"{len(os.sched_getaffinity(0))} usable by this process")


def llama_python(no_install: bool) -> str:
    """A python that imports llama_cpp: this one, else the bench venv (built on first use)."""
    check = "import llama_cpp"
    if subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0:
        return sys.executable
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0:
        return str(py)
    if no_install:
        sys.exit(f"llama_cpp imports neither here nor in {VENV}; drop --no-install to build it")
    print(f"llama-cpp-python is not installed: building it into {VENV} "
          f"(a source build, about 11 minutes on 2 cores) ...", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)],
                       check=True)
    subprocess.run([str(py), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return str(py)


def run_engine(python: str, engine: str, args, threads: int) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--engine", engine, "--json",
           "-m", str(args.model), "--threads", str(threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--seed", str(args.seed), "--inner-runs", str(args.inner_runs)]
    if args.batch:
        cmd += ["--batch", ",".join(map(str, args.batch)), "--work", str(args.work)]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("GOMP_SPINCOUNT", None)
    if USER_SPIN_COUNT is not None:
        env["GOMP_SPINCOUNT"] = USER_SPIN_COUNT
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode == -signal.SIGILL and engine == "llamacpp":
        # seen on a VM that advertises AMX but faults on it: llama.cpp's native build uses it
        sys.exit(f"llama.cpp died of SIGILL: it was built for an instruction this machine refuses "
                 f"(AMX in a VM, say). Rebuild it without -march=native: CMAKE_ARGS='-DGGML_NATIVE=OFF "
                 f"-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON' "
                 f"{python} -m pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python")
    if p.returncode != 0 or not lines:
        sys.exit(f"{engine} subprocess failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                 f"{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def ratio_line(name: str, ratios: list[float], width: int = 16) -> str:
    return (f"  {name:<{width}} min {min(ratios):6.2f}   median {statistics.median(ratios):6.2f}   "
            f"max {max(ratios):6.2f}   ({len(ratios)} paired runs)")


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(args) -> None:
    from torchless.hub import resolve_model

    args.model = resolve_model(args.model or "smollm2")
    py = llama_python(args.no_install)
    print(f"date      {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine   {machine()}")
    print(f"model     {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(f"workload  {args.prompt_tokens}-token prefill, then {args.gen_tokens} greedy decode "
          f"steps; per subprocess 1 warm-up + {args.inner_runs} measured; {args.runs} "
          f"subprocess pairs per thread count, alternating torchless, llama.cpp, ...")
    try:
        print(f"load      {os.getloadavg()[0]:.2f} (1-min load average at start)")
    except OSError:
        pass
    versions_shown = False
    for threads in args.threads:
        t_runs, l_runs = [], []
        for i in range(args.runs):
            t_runs.append(run_engine(sys.executable, "torchless", args, threads))
            l_runs.append(run_engine(py, "llamacpp", args, threads))
            print(f"  [threads {threads}] pair {i + 1}/{args.runs}: "
                  f"torchless {t_runs[-1]['prefill_tok_s']:.0f} / {t_runs[-1]['decode_tok_s']:.1f}"
                  f" tok/s, llama.cpp {l_runs[-1]['prefill_tok_s']:.0f} / "
                  f"{l_runs[-1]['decode_tok_s']:.1f} tok/s (prefill / decode)", flush=True)
        t, l = t_runs[0], l_runs[0]
        if not versions_shown:
            print(f"torchless {t['version']}; numba {t['numba']}; BLAS: {t['blas']}")
            print(f"llama.cpp {l['version']}; {l['system_info']}")
            versions_shown = True
        if t["vocab_size"] != l["vocab_size"] or t["prompt_head"] != l["prompt_head"]:
            print(f"WARNING: the engines saw different prompts (vocab {t['vocab_size']} vs "
                  f"{l['vocab_size']})")
        med = statistics.median
        print(f"\n== threads {threads} ==")
        print(f"  {'':<16} {'prefill tok/s':>14} {'decode tok/s':>14} {'peak RSS MB':>12} "
              f"{'load s':>8}")
        for name, runs in (("torchless", t_runs), ("llama.cpp", l_runs)):
            print(f"  {name:<16} {med(r['prefill_tok_s'] for r in runs):14.1f} "
                  f"{med(r['decode_tok_s'] for r in runs):14.1f} "
                  f"{med(r['peak_rss_mb'] for r in runs):12.0f} "
                  f"{med(r['load_s'] for r in runs):8.2f}")
        print("  torchless / llama.cpp (speed: higher is better for torchless; RSS: lower is)")
        print(ratio_line("prefill", [a["prefill_tok_s"] / b["prefill_tok_s"]
                                     for a, b in zip(t_runs, l_runs)]))
        print(ratio_line("decode", [a["decode_tok_s"] / b["decode_tok_s"]
                                    for a, b in zip(t_runs, l_runs)]))
        rss = med(r["peak_rss_mb"] for r in t_runs) / med(r["peak_rss_mb"] for r in l_runs)
        print(f"  {'peak RSS':<16} {rss:6.2f}   (ratio of medians)")
        agree = same_prefix(t["tokens"], l["tokens"])
        print(f"  greedy tokens: the engines agree on the first {agree} of {args.gen_tokens}")


def span(values) -> str:
    values = list(values)
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def compare_batch(args) -> None:
    import tempfile

    from torchless.hub import resolve_model

    args.model = resolve_model(args.model or "smollm2")
    py = llama_python(args.no_install)
    work = batch_prompts(args.model, max(args.batch))
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="compare-batch-",
                                     delete=False) as f:
        json.dump(work, f)
        args.work = f.name
    try:
        _compare_batch(args, py, work)
    finally:
        os.unlink(args.work)


def _compare_batch(args, py, work) -> None:
    T, batches, med = args.gen_tokens, args.batch, statistics.median
    lengths = [len(p) for p in work["prompts"]]
    print(f"date      {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine   {machine()}")
    print(f"model     {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(f"workload  batches of {', '.join(map(str, batches))} sequences; up to {T} greedy tokens "
          f"each (fewer if it ends); prompts of {min(lengths)}-{max(lengths)} tokens (the first "
          f"B of: {' '.join(map(str, lengths))}); end of sequence: ids {work['eos']}")
    print(f"          tok/s = completion tokens of the batch / wall time of the whole generation "
          f"(prefill included); per subprocess and B 1 warm-up + {args.inner_runs} measured; "
          f"{args.runs} subprocess pairs per thread count, alternating torchless, llama.cpp, ...")
    try:
        print(f"load      {os.getloadavg()[0]:.2f} (1-min load average at start)")
    except OSError:
        pass
    summary, versions_shown = [], False
    for threads in args.threads:
        t_runs, l_runs = [], []
        for i in range(args.runs):
            t_runs.append(run_engine(sys.executable, "torchless", args, threads))
            l_runs.append(run_engine(py, "llamacpp", args, threads))
            pair = "; ".join(f"B={B} {t_runs[-1]['batch'][str(B)]['tok_s']:.1f} / "
                             f"{l_runs[-1]['batch'][str(B)]['tok_s']:.1f}" for B in batches)
            print(f"  [threads {threads}] pair {i + 1}/{args.runs}: {pair} tok/s "
                  f"(torchless / llama.cpp)", flush=True)
        try:  # llama.cpp's threads spin at barriers: a busy machine hurts it at threads = cores
            print(f"  [threads {threads}] 1-min load average now {os.getloadavg()[0]:.2f}")
        except OSError:
            pass
        if not versions_shown:
            t, l = t_runs[0], l_runs[0]
            print(f"torchless {t['version']}; numba {t['numba']}; BLAS: {t['blas']}")
            print(f"llama.cpp {l['version']}; context: {l['settings']} (largest B); "
                  f"{l['system_info']}")
            versions_shown = True
        for B in batches:
            b = str(B)
            tl = [r["batch"][b]["tok_s"] for r in t_runs]
            ll = [r["batch"][b]["tok_s"] for r in l_runs]
            ratio = [x / y for x, y in zip(tl, ll)]
            print(f"\n== threads {threads}, batch {B} ==")
            print(f"  {'':<24} {'total tok/s median [min-max]':>30} {'tokens':>8}")
            for name, runs, vals in (("torchless", t_runs, tl), ("llama.cpp", l_runs, ll)):
                print(f"  {name:<24} {span(vals):>30} {runs[0]['batch'][b]['gen_tokens']:>8}")
            print(ratio_line("torchless / llama.cpp", ratio, 24))
            own = None
            if "1" in t_runs[0]["batch"] and B != 1:
                own = [r["batch"][b]["tok_s"] / r["batch"]["1"]["tok_s"] for r in t_runs]
                print(ratio_line("torchless / its B=1", own, 24))
                print(ratio_line("llama.cpp / its B=1",
                                 [r["batch"][b]["tok_s"] / r["batch"]["1"]["tok_s"]
                                  for r in l_runs], 24))
            t_tok, l_tok = t_runs[0]["batch"][b]["tokens"], l_runs[0]["batch"][b]["tokens"]
            prefix = [same_prefix(x, y) for x, y in zip(t_tok, l_tok)]
            full = sum(x == y for x, y in zip(t_tok, l_tok))
            print(f"  greedy tokens: {full} of {B} sequences identical; identical leading tokens "
                  f"per sequence (of torchless / llama.cpp lengths):")
            print("    " + "  ".join(f"{n}({len(x)}/{len(y)})"
                                     for n, x, y in zip(prefix, t_tok, l_tok)))
            for name, runs in (("torchless", t_runs), ("llama.cpp", l_runs)):
                if any(r["batch"][b]["tokens"] != runs[0]["batch"][b]["tokens"] for r in runs):
                    print(f"  NOTE: {name}'s greedy tokens differ between its runs")
            if B != 1 and "1" in t_runs[0]["batch"]:
                solo = t_runs[0]["batch"]["1"]["tokens"][0]
                if t_tok[0] != solo:
                    print(f"  NOTE: torchless's sequence 1 differs from its B=1 run after "
                          f"{same_prefix(t_tok[0], solo)} tokens")
            summary.append((threads, B, span(ll), span(tl), ratio, own, full, B))
    print("\n| threads | B | llama.cpp tok/s | torchless tok/s | torchless / llama.cpp "
          "(min / median / max) | torchless / its B=1 | sequences identical |")
    print("|---|---|---|---|---|---|---|")
    for threads, B, ls, ts, ratio, own, full, n in summary:
        own_s = (f"{statistics.median(own):.2f} ({min(own):.2f}-{max(own):.2f})"
                 if own else "-")
        print(f"| {threads} | {B} | {ls} | {ts} | {min(ratio):.2f} / {med(ratio):.2f} / "
              f"{max(ratio):.2f} | {own_s} | {full}/{n} |")


def thread_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, pulled if needed)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=None,
                    help="greedy tokens per sequence (default 128; 64 with --batch)")
    ap.add_argument("--batch", type=thread_list, default=None,
                    help="batched mode: comma-separated batch sizes, e.g. 1,8,16")
    ap.add_argument("--runs", type=int, default=5, help="subprocess pairs per thread count")
    ap.add_argument("--threads", type=thread_list, default=[2],
                    help="thread count, or a comma-separated list (e.g. 1,2) to do each")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of building llama-cpp-python when it is missing")
    ap.add_argument("--engine", choices=["torchless", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inner-runs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)  # the prompts of --batch, a JSON file
    args = ap.parse_args(argv)
    if args.gen_tokens is None:
        args.gen_tokens = 64 if args.batch else 128
    if args.batch is not None and (not args.batch or min(args.batch) < 1):
        ap.error("--batch takes positive batch sizes, e.g. 1,8,16")
    if args.engine:
        if len(args.threads) != 1:
            ap.error("--engine takes one thread count")
        args.threads = args.threads[0]
        limit_threads(args.threads)
        if args.model is None:
            from torchless.hub import resolve_model
            args.model = resolve_model("smollm2")
        own_work = bool(args.batch) and not args.work
        if own_work:
            args.work = _work_file(args)
        if args.batch:
            run = run_torchless_batch if args.engine == "torchless" else run_llamacpp_batch
        else:
            run = run_torchless if args.engine == "torchless" else run_llamacpp
        try:
            result = run(args)
        finally:
            if own_work:
                os.unlink(args.work)
        print(json.dumps(result) if args.json else result)
    elif args.batch:
        compare_batch(args)
    else:
        compare(args)


def _work_file(args) -> str:
    """--engine ... --batch by hand, without the driver: write the prompts now."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="compare-batch-",
                                     delete=False) as f:
        json.dump(batch_prompts(Path(args.model), max(args.batch)), f)
    return f.name


if __name__ == "__main__":
    main()
