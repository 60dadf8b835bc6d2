"""Batched quantized products: the float kernel (each tile expanded to float32 once per call, rows
of X multiplied in register blocks) and the direct kernel (codes converted in registers, scales
per group: direct_tiles), each forced at every M, interleaved in one process, on SmolLM2's
weight shapes (Q4_1 layers, Q8_0 head); with --blas, BLAS at the same M too (what sets
`gemm.MIN_TOKENS_FOR_BLAS`). `direct_tiles.DIRECT_MAX_ROWS` is where the expanded tiles take
over. The whole-model effect: benchmarks/compare.py --batch. (The integer kernels these were
measured against, int8 activations in three levels with VNNI dots, were deleted when the direct
kernels beat them: their figures are in direct_tiles' docstring.)

    python benchmarks/bench_batch_kernel.py --threads 1 [--m 1,2,4,8,16,32,64] [--blas]
                                            [--shapes Q4_1:4096x4096,Q4_1:4096x14336]

Prints per M and shape the median us per row of X [min-max over rounds], rows/s and
direct/float.
"""

import argparse
import time

import numba
import numpy as np

from torchless.kernels import direct_tiles, gemm, qmatmul
from torchless.kernels import qmatmul_batch as qb
from torchless.quant import GGMLType, QTensor

SHAPES = [("Q4_1", 576, 576), ("Q4_1", 192, 576), ("Q4_1", 1536, 576), ("Q4_1", 576, 1536),
          ("Q8_0", 49152, 576)]


def float_product(w, X, out):
    """The expanded float kernel at any M (the engine takes it from DIRECT_MAX_ROWS rows, and at
    every M on the layouts without direct kernels)."""
    expanded = qb._expanded_tiles_q4 if w.kind == "q4" else qb._expanded_tiles_q8
    expanded(w.codes, w.scale, w.min, X, out, 0, w.codes.shape[0])


def direct_product(w, X, out):
    """The direct kernel at any M (the engine takes it for 1 to DIRECT_MAX_ROWS - 1 rows)."""
    xs = direct_tiles.x_group_sums(w.codes, w.min, X)
    direct_tiles.direct_tiles(w.codes, w.scale, w.min, X, xs, out, 0, w.codes.shape[0])


def random_weight(kind, rows, cols, rng):
    size = {"Q4_1": 20, "Q5_0": 22, "Q8_0": 34}[kind]
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
    shapes = SHAPES if not args.shapes else [
        (kind, *map(int, size.split("x"))) for kind, size in (s.split(":") for s in args.shapes.split(","))]
    weights = [(kind, random_weight(kind, r, c, rng)) for kind, r, c in shapes]
    print(f"threads={args.threads}  us per row of X: median [min-max] over {args.rounds} rounds")
    for m in map(int, args.m.split(",")):
        for kind, w in weights:
            X = rng.standard_normal((m, w.cols)).astype(np.float32)
            out = np.empty((m, w.rows), np.float32)
            fns = {"float": lambda: float_product(w, X, out), "direct": lambda: direct_product(w, X, out)}
            if args.blas:
                fns["blas"] = lambda: gemm.matmul_blas_into(w, X, out, args.threads)
            calls = max(1, int(2e7 // (w.rows * w.cols * max(m, 4))))
            with gemm.single_threaded_blas():
                times = interleaved(fns, args.rounds, calls)
            per_row = {k: np.array(v) / m for k, v in times.items()}
            cells = "  ".join(f"{k} {np.median(v):8.1f} [{v.min():.1f}-{v.max():.1f}] "
                              f"({1e6 / np.median(v):7.0f} rows/s)" for k, v in per_row.items())
            line = f"M={m:3d} {kind} {w.rows:5d}x{w.cols:<5d} {cells}"
            ratio = per_row["direct"] / per_row["float"]
            line += f"  direct/float {np.median(ratio):.2f} [{ratio.min():.2f}-{ratio.max():.2f}]"
            print(line, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--m", default="1,2,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blas", action="store_true", help="time gemm.matmul_blas_into too")
    p.add_argument("--shapes", help="KIND:ROWSxCOLS,... (Q4_1, Q5_0 or Q8_0) instead of SmolLM2's shapes")
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    kernels(args)
