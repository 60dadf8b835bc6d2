"""Under mpiexec -n 2: the last pipeline stage raises mid-batch; the job must end, naming it."""

import sys

from torchless import LLM
from torchless.distributed import current_group, run_guarded

group = current_group()


def main():
    llm = LLM(sys.argv[1], parallel="pp=2,mb=2")
    if group.rank == 1:
        real = llm.runner.model.run_layers

        def failing(spans, x, start, stop, fast=False):
            if any(sp.start >= 6 for sp in spans):
                raise RuntimeError("injected failure")
            return real(spans, x, start, stop, fast)

        llm.runner.model.run_layers = failing
    llm(["Hello there", "Once upon a time"], max_tokens=16, temperature=0)


run_guarded(group, main)
