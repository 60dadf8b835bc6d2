"""The one-token attention kernel (`fused.attend_heads`) on SmolLM2's shape: 9 query heads over
3 KV heads of 64, at a given number of cached positions, on one thread.

    python benchmarks/bench_attention.py [--positions 300] [--calls 1000]
"""

import argparse
import time

import numba
import numpy as np

from torchless.kernels.fused import attend_heads

p = argparse.ArgumentParser()
p.add_argument("--positions", type=int, default=300)
p.add_argument("--calls", type=int, default=1000)
args = p.parse_args()
numba.set_num_threads(1)
rng = np.random.default_rng(0)
heads, kv_heads, head_dim, n = 9, 3, 64, args.positions
q = rng.standard_normal((heads, head_dim)).astype(np.float32)
k = rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32)
v = rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32)
kv_map = np.arange(heads, dtype=np.int64) // (heads // kv_heads)
out, scores = np.zeros((heads, head_dim), np.float32), np.zeros(n, np.float32)
attend_heads(q, k, v, n, kv_map, out, 0, heads, scores)
t0 = time.perf_counter()
for _ in range(args.calls):
    attend_heads(q, k, v, n, kv_map, out, 0, heads, scores)
print(f"attend_heads at {n} positions: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us per call (one layer)")
