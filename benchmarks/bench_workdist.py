"""Adaptive work distribution vs fixed chunk sizes, on decode-shaped matvecs (seed 6.1).

For each shape, `matmul_vec_adaptive_into` runs with the adaptive configuration
(`WorkDistributionConfig.for_matmul(rows, cols)`, what config=None uses) and with fixed chunks
of c rows (min = max = c), at the given numba thread count, with the inline path disabled so
every configuration runs as tasks. Configurations are interleaved in rounds (the machine is
shared and noisy) and each one's median and min over the rounds is reported. The bar: adaptive
within 5% of the best fixed chunk per shape.

Weights are random valid blocks: Q4_1, and Q8_0 for the 49152 x 576 output head (SmolLM2's).

    python benchmarks/bench_workdist.py [--threads 2] [--rounds 31] [--no-7b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from torchless.kernels import adaptive, qmatmul
from torchless.kernels.workdist import WorkDistributionConfig, WorkStealingStats
from torchless.quant import GGMLType, QTensor

SMOLLM2 = [(576, 576, "Q4_1"), (192, 576, "Q4_1"), (1536, 576, "Q4_1"), (576, 1536, "Q4_1"),
           (49152, 576, "Q8_0")]
SEVEN_B = [(4096, 4096, "Q4_1"), (14336, 4096, "Q4_1"), (4096, 14336, "Q4_1")]
FIXED = [32, 64, 128, 256, 512, 1024, 4096]


def random_weight(kind, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    bsize = {"Q4_1": 20, "Q8_0": 34}[kind]
    raw = rng.integers(0, 256, (rows, cols // 32, bsize), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # scale d
    if kind == "Q4_1":
        raw[..., 2:4] = np.frombuffer(np.float16(-0.05).tobytes(), np.uint8)
    return qmatmul.prepare(QTensor(GGMLType[kind], (rows, cols), raw.reshape(rows, -1)))


def time_call(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def bench_shape(rows, cols, kind, rounds, threads):
    w = random_weight(kind, rows, cols)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    configs = {"adaptive": WorkDistributionConfig.for_matmul(rows, cols)}
    for c in FIXED:
        if c <= max(rows, 32) * 2:
            configs[c] = WorkDistributionConfig(min_chunk_size=c, max_chunk_size=c)
    fns = {k: (lambda cfg=cfg: adaptive.matmul_vec_adaptive_into(w, x, out, cfg, None))
           for k, cfg in configs.items()}
    for fn in fns.values():
        fn()
    # calls per sample: about 2 ms of work, so timer and noise granularity do not dominate
    one = time_call(fns["adaptive"], 5)
    inner = max(1, int(2e-3 / max(one, 1e-7)))
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(time_call(fns[k], inner))
    med = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    n_tasks = {k: len(cfg.chunk_bounds(rows, align=qmatmul.TILE)) - 1 for k, cfg in configs.items()}
    stats = WorkStealingStats()
    for _ in range(50):
        adaptive.matmul_vec_adaptive_into(w, x, out, None, stats)
    return med, mins, n_tasks, w.nbytes, stats.steal_ratio()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--no-7b", action="store_true")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    adaptive._inline_bytes = 0  # every configuration runs as tasks
    shapes = SMOLLM2 + ([] if a.no_7b else SEVEN_B)
    print(f"numba threads {numba.get_num_threads()}, {a.rounds} interleaved rounds; times in us "
          f"(median over rounds; min in brackets)")
    print(f"{'shape':>14} {'type':>5} {'MB':>6} | {'best fixed':>10} {'its time':>16} | "
          f"{'adaptive (tasks)':>22} | {'ratio med':>9} {'ratio min':>9} | steal")
    misses = 0
    for rows, cols, kind in shapes:
        med, mins, n_tasks, nbytes, steal = bench_shape(rows, cols, kind, a.rounds, a.threads)
        fixed = [k for k in med if k != "adaptive"]
        best = min(fixed, key=lambda k: med[k])
        best_min = min(mins[k] for k in fixed)
        r_med, r_min = med["adaptive"] / med[best], mins["adaptive"] / best_min
        misses += r_med > 1.05
        print(f"{rows:>6}x{cols:<7} {kind:>5} {nbytes / 1e6:6.2f} | {best:>6} ({n_tasks[best]:>3}) "
              f"{med[best] * 1e6:8.1f} [{mins[best] * 1e6:7.1f}] | "
              f"{med['adaptive'] * 1e6:8.1f} [{mins['adaptive'] * 1e6:7.1f}] ({n_tasks['adaptive']:>3}) | "
              f"{r_med:9.3f} {r_min:9.3f} | {steal:.2f}")
        print("      all (median us): " + ", ".join(f"{k}: {med[k] * 1e6:.1f}" for k in med))
    print(f"shapes where adaptive is over 5% slower than the best fixed chunk (median): {misses}")


if __name__ == "__main__":
    main()
