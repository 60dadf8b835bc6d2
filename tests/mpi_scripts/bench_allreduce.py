"""Latency of all_reduce_sum on 576 float32s (SmolLM2's hidden size).

    python tests/mpi_scripts/bench_allreduce.py            # ThreadGroup, 2 and 3 members
    mpiexec -n 2 python tests/mpi_scripts/bench_allreduce.py   # MPIGroup
"""

import time

import numpy as np

from torchless.distributed import MPIGroup, current_group, run_in_threads

N, WARMUP, CALLS = 576, 200, 5000


def per_call_us(group) -> float:
    buf = np.zeros(N, np.float32)  # zeros: a sum that stays finite over many calls
    for _ in range(WARMUP):
        group.all_reduce_sum(buf)
    group.barrier()
    start = time.perf_counter()
    for _ in range(CALLS):
        group.all_reduce_sum(buf)
    return (time.perf_counter() - start) / CALLS * 1e6


if __name__ == "__main__":
    group = current_group()
    if isinstance(group, MPIGroup):
        us = group.comm.allreduce(per_call_us(group), op=group._MPI.MAX)
        if group.rank == 0:
            print(f"MPIGroup    n={group.world_size}: {us:7.1f} us per all_reduce_sum of {N} float32")
    else:
        for world in (2, 3):
            us = max(run_in_threads(world, per_call_us))
            print(f"ThreadGroup n={world}: {us:7.1f} us per all_reduce_sum of {N} float32")
