"""Under `mpiexec -n N`: each rank loads its tensor-parallel shard; rank 0 checks the logits at
every position (prefill, fast decode and the reference forward) against one whole model."""

import sys

import numpy as np

from torchless import Mistral, Parameters
from torchless.distributed import current_group
from torchless.kernels.tensor_parallel import TensorParallelConfig
from torchless.model.parallel import TensorParallelMistral

path, tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
group = current_group()
shard = TensorParallelMistral.load(Parameters.load(path), TensorParallelConfig(group.world_size, group.rank), group)

state = shard.new_state(64)
prefill = shard.prefill(state, tokens[:5], all_logits=True)
decode = np.stack([shard.fast_forward(state, t).copy() for t in tokens[5:]])
state = shard.new_state(64)
reference = np.stack([shard.forward(state, t).copy() for t in tokens])

if group.rank == 0:
    full = Mistral.load(Parameters.load(path))
    s = full.new_state(64)
    expected = np.stack([full.forward(s, t).copy() for t in tokens])
    ours = np.concatenate([prefill, decode])
    err = max(np.abs(a - expected).max() / np.abs(expected).max() for a in (ours, reference))
    print(f"world={group.world_size} max_rel_err={err:.3g}", flush=True)
    print("OK" if err <= 1e-4 else "MISMATCH", flush=True)
    sys.exit(0 if err <= 1e-4 else 1)
