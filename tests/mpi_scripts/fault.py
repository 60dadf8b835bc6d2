"""Rank 1 raises while the others wait on it (in a collective or a recv): the job must end."""

import sys

import numpy as np

from torchless.distributed import current_group, run_guarded


def main(group, where: str) -> None:
    buf = np.ones(576, np.float32)
    group.all_reduce_sum(buf)  # everyone is up and talking before the failure
    if group.rank == 1:
        raise ValueError("boom on purpose")
    if where == "recv":
        group.recv(buf, 1)
    else:
        group.all_reduce_sum(buf)
    sys.stdout.write(f"rank {group.rank} was not stopped\n")
    sys.stdout.flush()


if __name__ == "__main__":
    group = current_group()
    run_guarded(group, lambda: main(group, sys.argv[1]))
