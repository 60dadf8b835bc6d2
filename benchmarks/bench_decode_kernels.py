"""Decode-kernel throughput per weight type: G weights/s of one matvec on one core.

For each type, a random float32 matrix is quantized with gguf-py (the K types get random valid
blocks), repacked, and multiplied by a vector with `qmatmul.matvec_rows` (the single-thread
kernel a scheduler task runs) at sizes from in-cache (0.5 M weights) to past the L3 (16 M).
Reports the median of --reps calls (each call repeated to last at least ~2 ms) and packed GB/s.

    NUMBA_NUM_THREADS=1 python benchmarks/bench_decode_kernels.py [--types Q4_1,Q8_0] [--reps 31]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from torchless.kernels import qmatmul as qm
from torchless.quant import BLOCK_LAYOUT, QTensor

SIZES = [(512, 1024), (4096, 1024), (16384, 1024)]


def weight(qtype: GT, rows: int, cols: int, rng) -> qm.PackedWeight:
    if qtype in (GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.Q2_K, GT.Q3_K, GT.IQ4_NL, GT.IQ4_XS):
        # random blocks (gguf-py quantizes none of the 2-, 3-bit and IQ4 types)
        block, size = BLOCK_LAYOUT[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        # sane float16 super-block scales (and mins) where each type keeps them
        at = {GT.Q6_K: 208, GT.Q2_K: 80, GT.Q3_K: 108}.get(qtype, 0)
        n = 2 if qtype in (GT.Q4_K, GT.Q5_K, GT.Q2_K) else 1
        raw[..., at:at + 2 * n] = rng.uniform(1e-3, 2e-2, (rows, cols // block, n)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = np.ascontiguousarray(gq.quantize(w, qtype)).view(np.uint8).reshape(rows, -1)
    return qm.prepare(QTensor(int(qtype), (rows, cols), raw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K,Q2_K,Q3_K,IQ4_NL,IQ4_XS")
    p.add_argument("--reps", type=int, default=31)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'type':6} {'rows x cols':>12} {'packed MB':>9} {'G weights/s':>11} {'GB/s':>6}")
    for name in args.types.split(","):
        for rows, cols in SIZES:
            w = weight(GT[name], rows, cols, rng)
            x = rng.standard_normal(cols).astype(np.float32)
            out = np.empty(rows, np.float32)
            qm.matvec_rows(w, x, out, 0, rows)
            n = max(1, 2_000_000 // (rows * cols))
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                for _ in range(n):
                    qm.matvec_rows(w, x, out, 0, rows)
                times.append((time.perf_counter() - t) / n)
            dt = float(np.median(times))
            print(f"{name:6} {rows:>6} x {cols:<5} {w.nbytes / 1e6:9.2f} {rows * cols / dt / 1e9:11.1f} "
                  f"{w.nbytes / dt / 1e9:6.1f}")


if __name__ == "__main__":
    main()
