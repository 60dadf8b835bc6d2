"""Micro-batches of B one-token sequences through SmolLM2: the quantized matmul kernel against
the BLAS path (weights expanded to float32 per call), per B. This sets
`gemm.MIN_TOKENS_FOR_BLAS`.

    python benchmarks/bench_batch_kernel.py [--threads 2] [--batches 2,4,8,16,32,64]
"""

import argparse
import time

import numba

from torchless import Mistral, Parameters
from torchless.kernels import gemm
from torchless.model.mistral import Span

p = argparse.ArgumentParser()
p.add_argument("-m", "--model", default="smollm2")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batches", default="2,4,8,16,32,64")
p.add_argument("--steps", type=int, default=6)
args = p.parse_args()
numba.set_num_threads(args.threads)
model = Mistral.load(Parameters.load(args.model))
for b in map(int, args.batches.split(",")):
    for name, threshold in (("quantized", 10 ** 9), ("blas", 1)):
        gemm.MIN_TOKENS_FOR_BLAS = threshold
        states = [model.new_state(256) for _ in range(b)]
        for i, s in enumerate(states):
            model.prefill(s, [1 + i, 2, 3, 4])

        def step():
            model.forward_spans([Span(s, [5], s.pos) for s in states])

        with gemm.single_threaded_blas():
            step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            dt = time.perf_counter() - t0
        print(f"B={b:3d} {name:9s} {args.steps * b / dt:7.1f} tok/s")
