"""Decode-shaped benchmark of kernels/qmatmul on a real GGUF file (default: SmolLM2-135M Q4_1).

One "sweep" is what a decoded token multiplies: every 2-D weight of every layer in model order
(q, k, v, o, gate, up, down), then the output head (the tied token embedding when there is no
output.weight). Sweeping all of them, rather than repeating one matrix, keeps the timing honest
about caches. Reports weight GB/s (bytes of the file's blocks per second) and the matmul part of
a decode in tokens/s, for:
  - rows:   matvec_rows, single-threaded (what one scheduler task runs),
  - prange: matvec_into at 1 and 2 numba threads,
  - f32 np.dot: float32 dequantized weights through NumPy's BLAS (a near-bandwidth baseline;
    4-8x the bytes, so compare its ms, not its GB/s).
The machine is shared and noisy: each number is the min (and median) of --reps sweeps.

    python benchmarks/bench_qmatmul.py [--model PATH] [--reps 15] [--prefill 17]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the np.dot baseline: one thread, like 'rows'

import numba  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from torchless.kernels import packing, qmatmul as qm  # noqa: E402
from torchless.hub import resolve_model  # noqa: E402
from torchless.quant import QTensor  # noqa: E402

ORDER = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def load(path):
    r = GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    names = []
    i = 0
    while f"blk.{i}.attn_q.weight" in by_name:
        names += [f"blk.{i}.{p}.weight" for p in ORDER]
        i += 1
    names.append("output.weight" if "output.weight" in by_name else "token_embd.weight")
    mats = []
    for n in names:
        t = by_name[n]
        cols, rows = (int(d) for d in t.shape)
        data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        mats.append((n, QTensor(int(t.tensor_type), (rows, cols), data)))
    return mats


def timeit(fn, reps):
    fn()  # compile / warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF file or known name (default: SmolLM2, pulled if needed)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prefill", type=int, default=17, help="M for the matmul timing (0: skip)")
    ap.add_argument("--no-f32", action="store_true", help="skip the float32 baseline (memory)")
    a = ap.parse_args()
    a.model = resolve_model(a.model)

    mats = load(a.model)
    t0 = time.perf_counter()
    packed = [qm.prepare(q) for _, q in mats]
    t_prep = time.perf_counter() - t0
    file_bytes = sum(q.nbytes for _, q in mats)
    resident = sum(w.nbytes for w in packed)
    types = sorted({f"{packing._TYPE_NAMES.get(int(q.ggml_type))}" for _, q in mats})
    print(f"{a.model}: {len(mats)} matrices, types {types}, {file_bytes / 1e6:.1f} MB of weights "
          f"({resident / 1e6:.1f} MB repacked, prepare {t_prep:.2f} s), CPU threads {numba.config.NUMBA_NUM_THREADS}")

    rng = np.random.default_rng(0)
    xs = {w.cols: rng.standard_normal(w.cols).astype(np.float32) for w in packed}
    outs = [np.empty(w.rows, np.float32) for w in packed]
    head = packed[-1]

    def sweep_rows():
        for w, o in zip(packed, outs):
            qm.matvec_rows(w, xs[w.cols], o, 0, w.rows)

    def sweep_par():
        for w, o in zip(packed, outs):
            qm.matvec_into(w, xs[w.cols], o)

    def report(label, tmin, tmed, nbytes=file_bytes):
        print(f"  {label:<28} {tmin * 1e3:8.2f} ms (median {tmed * 1e3:7.2f})  "
              f"{nbytes / tmin / 1e9:6.2f} GB/s  {1 / tmin:7.1f} tok/s")

    print("decode sweep (all matrices once):")
    results = {}
    results["rows"] = timeit(sweep_rows, a.reps)
    report("matvec_rows (1 thread)", *results["rows"])
    for n in (1, 2):
        if n > numba.config.NUMBA_NUM_THREADS:
            continue
        numba.set_num_threads(n)
        results[f"par{n}"] = timeit(sweep_par, a.reps)
        report(f"matvec_into ({n} numba thr)", *results[f"par{n}"])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    th = timeit(lambda: qm.matvec_rows(head, xs[head.cols], outs[-1], 0, head.rows), a.reps)
    print(f"  of which the output head ({mats[-1][1].ggml_type.name} {head.shape}), 1 thread: {th[0] * 1e3:.2f} ms")

    if not a.no_f32:
        dense = [q.dequantize() for _, q in mats]
        f32_bytes = sum(d.nbytes for d in dense)

        def sweep_np():
            for d, o in zip(dense, outs):
                np.dot(d, xs[d.shape[1]], out=o)

        results["np"] = timeit(sweep_np, a.reps)
        report("f32 np.dot (1 BLAS thread)", *results["np"], nbytes=f32_bytes)
        print(f"  ratio matvec_rows / np.dot time (min): {results['rows'][0] / results['np'][0]:.2f}"
              f"  (float32 weights are {f32_bytes / file_bytes:.1f}x the bytes)")
        del dense

    if a.prefill:
        M = a.prefill
        Xs = {c: rng.standard_normal((M, c)).astype(np.float32) for c in xs}
        mouts = [np.empty((M, w.rows), np.float32) for w in packed]

        def sweep_mm():
            for w, o in zip(packed, mouts):
                qm.matmul_into(w, Xs[w.cols], o)

        print(f"prefill sweep, M={M} rows of X:")
        for n in (1, 2):
            if n > numba.config.NUMBA_NUM_THREADS:
                continue
            numba.set_num_threads(n)
            tmin, tmed = timeit(sweep_mm, max(3, a.reps // 3))
            print(f"  matmul_into ({n} numba thr)     {tmin * 1e3:8.2f} ms (median {tmed * 1e3:7.2f})  "
                  f"{M / tmin:7.1f} prompt tok/s (matrices only)")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


if __name__ == "__main__":
    main()
