"""Print what current_group() finds: kind, rank, world size."""

import sys

from torchless.distributed import current_group

group = current_group()
# One write per line: separate writes from the ranks interleave in mpiexec's output.
sys.stdout.write(f"{type(group).__name__} {group.rank} {group.world_size}\n")
sys.stdout.flush()
