"""Batched quantized products: the float kernel (`qmatmul.matmul_float_into`, each tile expanded
to float32) against the integer one (`qmatmul.matmul_into`, see kernels/qmatmul_batch.py),
interleaved in one process, on SmolLM2's weight shapes (Q4_1 layers, Q8_0 head) per batch M;
then BLAS at the same M (what sets `gemm.MIN_TOKENS_FOR_BLAS`); with --model, the whole
micro-batch step (`forward_spans` over B one-token spans) with either kernel.

    python benchmarks/bench_batch_kernel.py --threads 1 [--m 1,2,4,8,16,32,64] [--model smollm2]

Prints per M and shape the median us per row of X [min-max over rounds], rows/s, and new/old.
"""

import argparse
import time

import numba
import numpy as np

from torchless.kernels import gemm, qmatmul, qmatmul_batch
from torchless.quant import GGMLType, QTensor

SHAPES = [("Q4_1", 576, 576), ("Q4_1", 192, 576), ("Q4_1", 1536, 576), ("Q4_1", 576, 1536),
          ("Q8_0", 49152, 576)]


def random_weight(kind, rows, cols, rng):
    size = {"Q4_1": 20, "Q8_0": 34}[kind]
    raw = rng.integers(0, 256, (rows, cols // 32, size), dtype=np.uint8)
    raw[..., 0:2] = rng.uniform(0.001, 0.02, (rows, cols // 32, 1)).astype(np.float16).view(np.uint8)
    if kind == "Q4_1":
        raw[..., 2:4] = rng.uniform(-0.1, 0.1, (rows, cols // 32, 1)).astype(np.float16).view(np.uint8)
    return qmatmul.prepare(QTensor(GGMLType[kind], (rows, cols), raw.reshape(rows, -1)))


def interleaved(fns, rounds, calls):
    """{name: [us per call, per round]}: every round runs each candidate once, in turn."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return times


def kernels(args):
    rng = np.random.default_rng(0)
    weights = [(kind, random_weight(kind, r, c, rng)) for kind, r, c in SHAPES]
    print(f"threads={args.threads}  us per row of X: median [min-max] over {args.rounds} rounds")
    for m in map(int, args.m.split(",")):
        for kind, w in weights:
            X = rng.standard_normal((m, w.cols)).astype(np.float32)
            out = np.empty((m, w.rows), np.float32)
            fns = {"old": lambda: qmatmul.matmul_float_into(w, X, out),
                   "new": lambda: qmatmul.matmul_into(w, X, out)}
            if args.blas:
                fns["blas"] = lambda: gemm.matmul_blas_into(w, X, out, args.threads)
            calls = max(1, int(2e7 // (w.rows * w.cols * max(m, 4))))
            with gemm.single_threaded_blas():
                times = interleaved(fns, args.rounds, calls)
            per_row = {k: np.array(v) / m for k, v in times.items()}
            cells = "  ".join(f"{k} {np.median(v):8.1f} [{v.min():.1f}-{v.max():.1f}] "
                              f"({1e6 / np.median(v):7.0f} rows/s)" for k, v in per_row.items())
            ratio = per_row["old"] / per_row["new"]
            print(f"M={m:3d} {kind} {w.rows:5d}x{w.cols:<5d} {cells}  old/new {np.median(ratio):.2f} "
                  f"[{ratio.min():.2f}-{ratio.max():.2f}]", flush=True)


def model_step(args):
    from torchless import Mistral, Parameters
    from torchless.model.mistral import Span

    model = Mistral.load(Parameters.load(args.model))
    integer = dict(qmatmul_batch._INT_PAR)
    for b in map(int, args.m.split(",")):
        states = [model.new_state(256) for _ in range(b)]
        for i, s in enumerate(states):
            model.prefill(s, [1 + i, 2, 3, 4])

        def step(use_integer):
            qmatmul_batch._INT_PAR.clear()
            if use_integer:
                qmatmul_batch._INT_PAR.update(integer)
            model.forward_spans([Span(s, [5], s.pos) for s in states])

        with gemm.single_threaded_blas():
            times = interleaved({"old": lambda: step(False), "new": lambda: step(True)},
                                args.rounds, args.steps)
        tok = {k: b * 1e6 / np.array(v) for k, v in times.items()}
        print(f"B={b:3d} step: " + "  ".join(f"{k} {np.median(v):7.1f} tok/s [{v.min():.1f}-{v.max():.1f}]"
                                               for k, v in tok.items())
              + f"  new/old {np.median(tok['new'] / tok['old']):.2f}", flush=True)
    qmatmul_batch._INT_PAR.update(integer)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--m", default="1,2,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--blas", action="store_true", help="time gemm.matmul_blas_into too")
    p.add_argument("--model", help="also time forward_spans over B one-token sequences")
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    kernels(args)
    if args.model:
        model_step(args)
