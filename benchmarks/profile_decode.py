"""Where a decode step's time goes: `Mistral.fast_forward` under cProfile.

    python benchmarks/profile_decode.py [--threads 2] [--prompt 256] [--steps 32]

Prints the decode rate without the profiler (64 steps after a --prompt-token prefill), then the
functions with the most time of their own over --steps profiled steps. The compiled kernels
show as single entries (`_tasks_q4`: Q4_1 matvec tasks, `_tasks_q8`: the Q8_0 LM head,
`_attention_tasks`: attention); the rest is Python and dispatch.
"""

import argparse
import cProfile
import pstats
import time

import numba

from torchless import Mistral, Parameters

p = argparse.ArgumentParser()
p.add_argument("-m", "--model", default="smollm2")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--prompt", type=int, default=256)
p.add_argument("--steps", type=int, default=32)
args = p.parse_args()
numba.set_num_threads(args.threads)
model = Mistral.load(Parameters.load(args.model))
state = model.new_state(args.prompt + 64 + args.steps + 8)
model.prefill(state, list(range(100, 100 + args.prompt)))
for _ in range(5):
    model.fast_forward(state, 5)
t0 = time.perf_counter()
for _ in range(64):
    model.fast_forward(state, 5)
dt = time.perf_counter() - t0
print(f"decode {64 / dt:.1f} tok/s, {1000 * dt / 64:.2f} ms/token (no profiler)")
profiler = cProfile.Profile()
profiler.enable()
for _ in range(args.steps):
    model.fast_forward(state, 5)
profiler.disable()
print(f"per token below: divide by {args.steps}")
pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
