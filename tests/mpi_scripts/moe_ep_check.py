"""Under `mpiexec -n N` with a Mixtral file: each rank loads its tensor-parallel shard, whose MoE
layers keep only this rank's experts (expert parallelism). Rank 0 prints the expert weight
bytes each rank holds (stored and repacked) next to the whole model's; rank 0 checks the logits at every
position (prefill, fast decode, the reference forward) against one whole model in one process."""

import sys

import numpy as np

from torchless import Mistral, Parameters
from torchless.distributed import current_group
from torchless.kernels.tensor_parallel import TensorParallelConfig
from torchless.model.parallel import TensorParallelMistral

path, tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
group = current_group()
params = Parameters.load(path)
shard = TensorParallelMistral.load(params, TensorParallelConfig(group.world_size, group.rank), group)

experts = [linear for layer in shard.layers for linear in layer.moe.expert_linears()]
whole = sum(t.nbytes for name, t in params.tensors.items() if "_exps." in name)
mine = sum(linear.weight.nbytes for linear in experts)
line = (f"rank={group.rank} experts={','.join(map(str, sorted(shard.layers[0].moe.experts)))} "
        f"stored_bytes={mine} of={whole} packed_bytes={sum(linear.packed.nbytes for linear in experts)}")
lines = [group.broadcast_object(line if group.rank == r else None, root=r) for r in range(group.world_size)]
if group.rank == 0:  # one process prints them all, so their lines do not interleave
    print("\n".join(lines), flush=True)

state = shard.new_state(64)
prefill = shard.prefill(state, tokens[:5], all_logits=True)
decode = np.stack([shard.fast_forward(state, t).copy() for t in tokens[5:]])
state = shard.new_state(64)
reference = np.stack([shard.forward(state, t).copy() for t in tokens])

if group.rank == 0:
    full = Mistral.load(Parameters.load(path))
    s = full.new_state(64)
    expected = np.stack([full.forward(s, t).copy() for t in tokens])
    packed = sum(linear.packed.nbytes for layer in full.layers for linear in layer.moe.expert_linears())
    print(f"whole_packed_bytes={packed}", flush=True)
    ours = np.concatenate([prefill, decode])
    err = max(np.abs(a - expected).max() / np.abs(expected).max() for a in (ours, reference))
    print(f"world={group.world_size} max_rel_err={err:.3g}", flush=True)
    print("OK" if err <= 1e-4 else "MISMATCH", flush=True)
    sys.exit(0 if err <= 1e-4 else 1)
