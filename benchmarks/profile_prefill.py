"""Where a prompt's prefill time goes: `Mistral.prefill` under cProfile.

    python benchmarks/profile_prefill.py [--threads 2] [--prompt 256] [--runs 5]

Prints the prefill rate without the profiler (median and range of --runs), then the functions
with the most time of their own over one profiled prefill. Products run through BLAS on
expanded weights (`matmul_blas_into`, its threads' `_part`); the numpy entries (exp, matmul in
attention, the norms) run on the calling thread alone, so at 2 threads they are the part that
does not scale.
"""

import argparse
import cProfile
import pstats
import statistics
import time

import numba

from torchless import Mistral, Parameters
from torchless.kernels.gemm import single_threaded_blas

p = argparse.ArgumentParser()
p.add_argument("-m", "--model", default="smollm2")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--prompt", type=int, default=256)
p.add_argument("--runs", type=int, default=5)
args = p.parse_args()
numba.set_num_threads(args.threads)
model = Mistral.load(Parameters.load(args.model))
tokens = list(range(100, 100 + args.prompt))


def prefill():
    state = model.new_state(args.prompt + 8)
    with single_threaded_blas():  # as the engine's runner does
        model.prefill(state, tokens)


prefill()
times = []
for _ in range(args.runs):
    t0 = time.perf_counter()
    prefill()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"prefill {args.prompt / med:.0f} tok/s, {1000 * med:.1f} ms [{1000 * min(times):.1f}-{1000 * max(times):.1f}] "
      f"at {args.threads} threads (no profiler)")
profiler = cProfile.Profile()
profiler.enable()
prefill()
profiler.disable()
pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
