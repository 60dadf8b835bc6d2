"""Under mpiexec: greedy batched generation with --parallel SPEC (an S-stage pipeline of ranks,
or tensor-parallel ranks) equals each prompt run alone in one process (computed on rank 0), and
a stream left unfinished does not leave the ranks out of step.
argv: model, max_tokens, spec, prompts..."""

import sys

from torchless import LLM
from torchless.distributed import current_group, run_guarded

path, max_tokens, spec, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
group = current_group()


def main():
    alone = None
    if group.rank == 0:
        single = LLM(path)
        alone = [single(p, max_tokens=max_tokens, temperature=0)["choices"][0]["text"] for p in prompts]
    llm = LLM(path, parallel=spec)
    out = llm(prompts, max_tokens=max_tokens, temperature=0)
    one = llm(prompts[0], max_tokens=max_tokens, temperature=0)  # one prompt: the same path
    # a stream left unfinished, then another call: every rank must still pair its calls
    stream = llm(prompts[1], max_tokens=max_tokens, temperature=0, stream=True)
    next(stream, None)  # (other ranks: runs rank 0's steps of this call, which the next call ends)
    again = llm(prompts[0], max_tokens=max_tokens, temperature=0)
    if group.rank == 0:
        assert again["choices"][0]["text"] == alone[0]
        texts = [c["text"] for c in out["choices"]]
        assert texts == alone, (texts, alone)
        assert one["choices"][0]["text"] == alone[0]
        print("OK", flush=True)


run_guarded(group, main)
