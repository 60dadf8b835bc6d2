"""Whether this machine's cores share their arithmetic: one single-threaded sgemm alone, then two
at once in two processes. On real cores each of the two keeps its speed; on two vCPUs of one
physical core (or a host that overcommits) each gets about half, and no compute-bound work can
gain from a second thread.

    python benchmarks/bench_shared_cores.py
"""

import os
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # after the thread count is set


def gflops() -> float:
    a = np.random.rand(256, 576).astype(np.float32)  # SmolLM2's MLP shape, a 256-token chunk
    b = np.random.rand(576, 1536).astype(np.float32)
    for _ in range(20):
        a @ b
    t0 = time.perf_counter()
    for _ in range(300):
        a @ b
    return 300 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        print(f"{gflops():.1f}")
        sys.exit()
    one = [sys.executable, __file__, "--one"]
    alone = subprocess.run(one, capture_output=True, text=True, check=True).stdout.strip()
    pair = [subprocess.Popen(one, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = [p.communicate()[0].strip() for p in pair]
    print(f"sgemm, one thread: {alone} GFLOP/s alone; {' and '.join(together)} GFLOP/s two at once")
