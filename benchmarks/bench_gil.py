"""How much of a decoding thread's wall time holds the GIL, and what that costs two threads,
with each layer's blocks as one compiled call (fused) and kernel by kernel (unfused, as before).

Three figures per path, the paths alternating run by run (medians, min and max):
- decode tok/s of one thread, one sequence;
- the GIL share: a probe thread spinning in Python beside the decoding thread gets the GIL only
  while the decoder does not hold it, so 1 - (its rate beside the decoder / its rate alone) is
  the share of wall time the decoder holds (or waits for) the GIL. On a machine whose cores are
  busy the probe also waits for a core and overstates it: --py-spy instead samples a child
  decoding alone with `py-spy record --gil` (samples holding the GIL) and `--idle` (all
  samples), decode steps (--py-spy-batch 1) or micro-batches of B one-token spans;
- total tok/s of two threads each decoding its own sequence, over one thread's;
and with --batch, tok/s of micro-batches of B one-token spans through `forward_spans`.
numba runs one thread per caller throughout, so the threads compete only for the GIL and cores.

    python benchmarks/bench_gil.py [-m smollm2] [--tokens 48] [--runs 5] [--batch 8,16]
    python benchmarks/bench_gil.py --py-spy --py-spy-batch 1,8 [--tokens 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numba
import numpy as np

from torchless import Mistral, Parameters
from torchless.model.mistral import Span
from torchless.hub import resolve_model

PROBE_SWITCH_INTERVAL_S = 1e-4  # the probe hands the GIL back quickly when the decoder wants it


def set_fused(model: Mistral, fused: bool) -> None:
    """Fused: the model's own compiled blocks; unfused: every block kernel by kernel."""
    if fused:
        model.__dict__.pop("fused_blocks", None)
    else:
        unfused = [(None, None)] * len(model.layers)
        model.fused_blocks = lambda work=None: unfused


def decode(model: Mistral, n_tokens: int, first_token: int = 1) -> float:
    """Greedy decode of n_tokens from a fresh sequence; returns the seconds it took."""
    numba.set_num_threads(1)  # per thread in numba: a new thread starts with all of them
    state, token = model.new_state(n_tokens + 1), first_token
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(np.argmax(model.fast_forward(state, token)))
    return time.perf_counter() - t0


def probe_rate(seconds: float | None = None, busy: threading.Thread | None = None) -> float:
    """Iterations per second of a Python loop, alone for `seconds` or while `busy` runs."""
    count, t0 = 0, time.perf_counter()
    while (busy.is_alive() if busy else time.perf_counter() - t0 < seconds):
        count += 1
    return count / (time.perf_counter() - t0)


def gil_share(model: Mistral, n_tokens: int) -> float:
    alone = probe_rate(seconds=0.5)
    decoder = threading.Thread(target=decode, args=(model, n_tokens))
    decoder.start()
    beside = probe_rate(busy=decoder)
    decoder.join()
    return max(0.0, 1.0 - beside / alone)


def two_thread_speedup(model: Mistral, n_tokens: int) -> tuple[float, float]:
    """(tok/s of one thread, total tok/s of two threads decoding their own sequences)."""
    one = n_tokens / decode(model, n_tokens)
    threads = [threading.Thread(target=decode, args=(model, n_tokens, 1 + i)) for i in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return one, 2 * n_tokens / (time.perf_counter() - t0)


def batch_rate(model: Mistral, batch: int, n_steps: int) -> float:
    states = [model.new_state(n_steps + 1) for _ in range(batch)]
    tokens = list(range(1, batch + 1))
    t0 = time.perf_counter()
    for _ in range(n_steps):
        logits = model.forward_spans([Span(s, [t], s.pos) for s, t in zip(states, tokens)])
        tokens = [int(t) for t in logits.argmax(axis=1)]
    return batch * n_steps / (time.perf_counter() - t0)


def measured_run(model: Mistral, n_tokens: int, batch: int) -> None:
    """What a --py-spy child runs after its warm-up; its samples are those under this name."""
    if batch == 1:
        decode(model, n_tokens)
    else:
        batch_rate(model, batch, max(1, n_tokens // batch))


def py_spy_gil_share(args, path: str, batch: int) -> float:
    """GIL samples / all samples of a child's measured_run, sampled by py-spy."""
    child = [sys.executable, __file__, "-m", args.model, "--child", path, "--tokens",
             str(args.tokens), "--py-spy-batch", str(batch)]
    counts = []
    for mode in ("--gil", "--idle"):
        with tempfile.NamedTemporaryFile(suffix=".txt") as out:
            subprocess.run(["py-spy", "record", mode, "-r", "200", "-f", "raw", "-o", out.name, "--",
                            *child], check=True, capture_output=True)
            lines = open(out.name).read().splitlines()
        counts.append(sum(int(line.rsplit(" ", 1)[1]) for line in lines if "measured_run (" in line))
    return counts[0] / max(1, counts[1])


def summary(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", default="", help="micro-batch sizes, e.g. 8,16")
    parser.add_argument("--batch-threads", type=int, default=1)
    parser.add_argument("--py-spy", action="store_true", help="GIL share sampled by py-spy")
    parser.add_argument("--py-spy-batch", default="1", help="1: decode steps; B: micro-batches")
    parser.add_argument("--child", choices=("fused", "unfused"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.py_spy:
        for _ in range(args.runs):
            for batch in (int(b) for b in args.py_spy_batch.split(",")):
                for path in ("unfused", "fused"):
                    print(f"B={batch} {path} GIL share {py_spy_gil_share(args, path, batch):.3f}",
                          flush=True)
        return 0
    numba.set_num_threads(1)
    model = Mistral.load(Parameters.load(resolve_model(args.model)))
    if args.child:
        set_fused(model, args.child == "fused")
        batch = int(args.py_spy_batch)
        if batch == 1:  # warm-up (compiling, loading caches), outside measured_run's samples
            decode(model, 4)
        else:
            batch_rate(model, batch, 2)
        measured_run(model, args.tokens, batch)
        return 0
    sys.setswitchinterval(PROBE_SWITCH_INTERVAL_S)
    results = {path: {"tok/s": [], "GIL share": [], "2 threads tok/s": [], "2 threads / 1": []}
               for path in ("unfused", "fused")}
    batches = [int(b) for b in args.batch.split(",") if b]
    for path in results:  # warm-up: compile both paths
        set_fused(model, path == "fused")
        decode(model, 4)
        for b in batches:
            batch_rate(model, b, 2)
    for _ in range(args.runs):
        for path, figures in results.items():
            set_fused(model, path == "fused")
            one, two = two_thread_speedup(model, args.tokens)
            figures["tok/s"].append(one)
            figures["2 threads tok/s"].append(two)
            figures["2 threads / 1"].append(two / one)
            figures["GIL share"].append(gil_share(model, args.tokens))
            numba.set_num_threads(args.batch_threads)
            for b in batches:
                figures.setdefault(f"batch {b} tok/s", []).append(batch_rate(model, b, args.tokens // 4))
            numba.set_num_threads(1)
    for path, figures in results.items():
        print(path)
        for name, values in figures.items():
            print(f"  {name:18s} {summary(values, '{:.2f}' if 'share' in name or '/' in name else '{:.1f}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
