"""Resident memory a tensor-parallel rank gains by loading its shard.

    python benchmarks/bench_tp_memory.py MODEL.gguf                  # one process, whole model
    mpiexec -n 2 python benchmarks/bench_tp_memory.py MODEL.gguf     # one shard per rank

Each rank prints its packed weight bytes, its RSS growth across `TensorParallelMistral.load`
(psutil, current RSS before and after) and its peak RSS. A model whose weights dominate is
written by the tests' helper: see benchmarks/README.md.
"""

import resource
import sys

import psutil

from torchless import Mistral, Parameters
from torchless.distributed import current_group
from torchless.kernels.tensor_parallel import TensorParallelConfig
from torchless.model.parallel import TensorParallelMistral

group = current_group()
process = psutil.Process()
before = process.memory_info().rss
params = Parameters.load(sys.argv[1])
if group.world_size == 1:
    model = Mistral.load(params)
else:
    model = TensorParallelMistral.load(params, TensorParallelConfig(group.world_size, group.rank), group)
after = process.memory_info().rss
print(f"rank {group.rank}/{group.world_size}: packed {model.weight_bytes_per_token() / 1e6:.0f} MB, "
      f"RSS +{(after - before) / 1e6:.0f} MB by loading, "
      f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
