"""The LM head's batched product: all rows of X per tile, or four rows at a time.

    python benchmarks/bench_lm_head.py [-m smollm2] [--rounds 5]

One thread: the serial batched kernel (qmatmul_batch.FLOAT_TILES: the direct kernels under 5
rows, expanded float32 tiles from 5) on the model's LM head and on
one layer's ffn_up, for 1, 4, 8 and 16 rows of X, all rows per tile and in 4-row slices: best of
--rounds, microseconds, and whether the two are bit-equal; and, for comparison, the float
decode kernel (qmatmul.matvec_rows) run once per row. (Slicing the head in the engine was
tried and dropped: the ratio here went from 0.94x to 1.38x between runs, and whole generations
of 16 prompts x 64 tokens moved by 0-2%.)
Not part of CI.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np


def best_us(fn, n: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    numba.set_num_threads(1)
    from torchless import LLM
    from torchless.kernels import qmatmul, qmatmul_batch

    llm = LLM(args.model, seed=0)
    rng = np.random.default_rng(0)
    for name, linear in (("LM head", llm.model.output), ("ffn_up", llm.model.layers[0].ffn_up)):
        w = linear.packed
        kernel = qmatmul_batch.FLOAT_TILES[w.kind]
        for m in (1, 4, 8, 16):
            X = rng.standard_normal((m, w.shape[1])).astype(np.float32)
            whole_out, sliced_out = np.empty((m, w.shape[0]), np.float32), np.empty((m, w.shape[0]), np.float32)

            def whole():
                kernel(w.codes, w.scale, w.min, X, whole_out, 0, w.codes.shape[0])

            def sliced():
                for m0 in range(0, m, 4):
                    kernel(w.codes, w.scale, w.min, X[m0:m0 + 4], sliced_out[m0:m0 + 4], 0, w.codes.shape[0])

            def by_row():  # the decode kernel (float, one FMA per weight), once per row
                for i in range(m):
                    qmatmul.matvec_rows(w, X[i], sliced_out[i], 0, w.shape[0])

            n = max(3, int(2e7 // (w.shape[0] * w.shape[1])))
            a, b = best_us(whole, n, args.rounds), best_us(sliced, n, args.rounds)
            equal = np.array_equal(whole_out, sliced_out)
            c = best_us(by_row, n, args.rounds)
            print(f"{name:8s} {w.shape} {m:2d} rows: whole {a:9.1f} us, by 4 {b:9.1f} us "
                  f"({a / b:.2f}x), bit-equal {equal}; decode matvec per row {c:9.1f} us")


if __name__ == "__main__":
    main()
