"""Throughput of batched generation: N prompts x T new greedy tokens, in total generated tok/s.

    python benchmarks/bench_pipeline.py [-m smollm2] [--prompts 8] [--tokens 64] [--mb 4]

Runs, in one script on the same prompts (each mode in its own subprocess, so thread settings
and peak RSS are its own; rounds alternate the modes so slow spells hit all alike):
  sequential   one process at 1 thread, one prompt after another (the single-sequence path)
  batched-1t   all prompts as one micro-batch per step, 1 process at 1 thread, no pipeline
  batched      the same at 2 threads
  pp2-threads  2 pipeline stages as threads of one process, 1 thread each, up to --mb micro-batches
  pp2-mpi      mpiexec -n 2: one stage per rank, 1 thread each
For the pipelines it also reports each stage's idle share of the wall time (the bubble) next to
PipelineConfig's fill/drain prediction (S - 1) / (M + S - 1), M the most micro-batches that were
in flight at once (the engine keeps them at 4 rows or more: fewer than --mb on few prompts).
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The sky is blue because",
           "1, 2, 3, 4,", "My favourite food is", "Water boils at", "Hello, my name is",
           "In 1492,", "The best way to learn", "import numpy as np", "Dear Sir or Madam,"]

MODES = {  # name -> (threads per process, --parallel, mpi ranks)
    "sequential": (1, None, 0),
    "batched-1t": (1, None, 0),
    "batched": (2, None, 0),
    "pp2-threads": (2, "pp=2,mb={mb}", 0),
    "pp2-mpi": (1, "pp=2,mb={mb}", 2),
}


def run_mode(args) -> None:
    """In the subprocess: load, warm up, time one generation of the batch, print JSON."""
    from torchless import LLM

    parallel = args.parallel.format(mb=args.mb) if args.parallel else None
    # no prefix cache: the measured call repeats the warm-up's prompts (so would every mode)
    llm = LLM(args.model, parallel=parallel, prefix_cache_bytes=0)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:args.prompts]
    sequential = args.mode == "sequential"

    def generate(n_tokens):
        if sequential:
            return [llm(p, max_tokens=n_tokens, temperature=0) for p in prompts]
        return [llm(prompts, max_tokens=n_tokens, temperature=0)]

    generate(4)  # compile and fault in
    runner = llm.runner
    if hasattr(runner, "reset_stats"):  # the pipelines: their stages' busy time
        runner.reset_stats()
    t0 = time.perf_counter()
    results = generate(args.tokens)
    wall = time.perf_counter() - t0
    import resource

    report = {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if hasattr(runner, "bubble"):
        report["bubble"] = runner.bubble(wall)
    if runner.is_driver:  # MPI: rank 0 has the text; every rank has its stage
        n = sum(r["usage"]["completion_tokens"] for r in results)
        report["generated"] = n
        report["tok_s"] = n / wall
    from torchless.distributed import current_group

    group = current_group()
    if group.world_size > 1:
        import numpy as np

        idle = np.zeros(group.world_size, np.float32)
        idle[group.rank] = report["bubble"]["idle_share"][0]
        report["bubble"]["idle_share"] = group.all_reduce_sum(idle).tolist()
        if group.rank != 0:
            return
    print(json.dumps(report))


def launch(mode: str, args) -> dict:
    threads, parallel, ranks = MODES[mode]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--run", mode, "-m", args.model, "--prompts", str(args.prompts),
           "--tokens", str(args.tokens), "--mb", str(args.mb)]
    if parallel:
        cmd += ["--parallel", parallel]
    if ranks:
        cmd = [shutil.which("mpiexec"), "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--mb", type=int, default=4, help="most micro-batches in flight (default 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--run", dest="mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        return run_mode(args)
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in modes:
            runs[mode].append(launch(mode, args))
            print(f"round {rnd + 1} {mode:12s} {runs[mode][-1]['tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)
    def median_of(mode):
        return statistics.median(r["tok_s"] for r in runs[mode]) if mode in runs else float("nan")

    bases = [median_of(m) for m in ("sequential", "batched-1t", "batched")]
    print(f"{args.prompts} prompts x {args.tokens} new tokens, greedy; median of {args.rounds} rounds")
    print(f"{'mode':12s} {'tok/s':>8s} {'min':>7s} {'max':>7s} {'x seq':>6s} {'x b-1t':>6s} {'x b-2t':>6s} "
          f"{'RSS MB':>7s}  bubble (idle share per stage; predicted)")
    for mode in modes:
        rates = [r["tok_s"] for r in runs[mode]]
        med = statistics.median(rates)
        ratios = " ".join(f"{med / b:6.2f}" for b in bases)
        line = (f"{mode:12s} {med:8.1f} {min(rates):7.1f} {max(rates):7.1f} {ratios} "
                f"{statistics.median(r['peak_rss_mb'] for r in runs[mode]):7.0f}")
        if "bubble" in runs[mode][0]:
            idle = [statistics.median(r["bubble"]["idle_share"][k] for r in runs[mode])
                    for k in range(len(runs[mode][0]["bubble"]["idle_share"]))]
            bubble = runs[mode][0]["bubble"]
            line += (f"  {', '.join(f'{i:.2f}' for i in idle)}; {bubble['predicted']:.2f} "
                     f"({bubble['micro_batches']} micro-batches)")
        print(line)


if __name__ == "__main__":
    main()
