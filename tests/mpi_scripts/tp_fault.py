"""Under `mpiexec -n 2`: rank 1 raises in the middle of decoding; the job must end, naming it."""

import sys

from torchless import Parameters
from torchless.distributed import current_group, run_guarded
from torchless.kernels.tensor_parallel import TensorParallelConfig
from torchless.model.parallel import TensorParallelMistral

group = current_group()
model = TensorParallelMistral.load(Parameters.load(sys.argv[1]), TensorParallelConfig(group.world_size, group.rank), group)


def decode():
    state = model.new_state(32)
    for i, token in enumerate([1, 2, 3, 4, 5, 6]):
        if group.rank == 1 and i == 3:
            raise RuntimeError("injected failure")
        model.fast_forward(state, token)


run_guarded(group, decode)
