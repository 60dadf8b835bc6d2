"""torchless against llama.cpp (through llama-cpp-python) on the same GGUF file.

Workload of one run: a --prompt-tokens prefill (default 256) followed by --gen-tokens greedy
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

llama-cpp-python is used from the current python if it imports; otherwise from a separate venv
(~/.cache/torchless/bench-venv, made with --system-site-packages), which is created and
`pip install llama-cpp-python`'d on first use: a source build, about 11 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV = Path.home() / ".cache" / "torchless" / "bench-venv"
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

    try:
        from threadpoolctl import threadpool_limits
        blas_limit = threadpool_limits(limits=args.threads)  # kept alive for the whole process
    except ImportError:
        blas_limit = None
    numba.set_num_threads(args.threads)

    from torchless import InferenceState, Mistral, Parameters

    t0 = time.perf_counter()
    model = Mistral.load(Parameters.load(args.model))
    load_s = time.perf_counter() - t0
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
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        sys.exit(f"{engine} subprocess failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                 f"{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def ratio_line(name: str, ratios: list[float]) -> str:
    return (f"  {name:<16} min {min(ratios):6.2f}   median {statistics.median(ratios):6.2f}   "
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


def thread_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, pulled if needed)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="subprocess pairs per thread count")
    ap.add_argument("--threads", type=thread_list, default=[2],
                    help="thread count, or a comma-separated list (e.g. 1,2) to do each")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of building llama-cpp-python when it is missing")
    ap.add_argument("--engine", choices=["torchless", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inner-runs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        if len(args.threads) != 1:
            ap.error("--engine takes one thread count")
        args.threads = args.threads[0]
        limit_threads(args.threads)
        if args.model is None:
            from torchless.hub import resolve_model
            args.model = resolve_model("smollm2")
        result = (run_torchless if args.engine == "torchless" else run_llamacpp)(args)
        print(json.dumps(result) if args.json else result)
    else:
        compare(args)


if __name__ == "__main__":
    main()
