"""How each part of a decode step scales from 1 to 2 threads: the model's own block calls timed
in one process, thread counts alternating.

    python benchmarks/profile_blocks.py [-m smollm2] [--prompt 256] [--rounds 7]

Times `decode_attention` and `decode_mlp` over all layers (each block kernel by kernel, a
parallel region per product), `decode_layer` (both blocks as one call and one parallel region,
what `fast_forward` runs) and `decode_logits` (the LM head), 10 calls each per round at 1 and
then 2 threads, after a --prompt-token prefill; prints the median ms of each part at each
thread count and their ratio. Alternating within one process keeps a shared machine's drift
out of the ratio.
"""

import argparse
import statistics
import time

import numba

from torchless import Mistral, Parameters

p = argparse.ArgumentParser()
p.add_argument("-m", "--model", default="smollm2")
p.add_argument("--prompt", type=int, default=256)
p.add_argument("--rounds", type=int, default=7)
args = p.parse_args()
model = Mistral.load(Parameters.load(args.model))
state = model.new_state(args.prompt + 8)
model.prefill(state, list(range(100, 100 + args.prompt)))
model.fast_forward(state, 5)  # the blocks below recompute this token's slot, call after call
layers = range(len(model.layers))
x0 = state.x.copy()


def from_x0(run):
    """Each call starts from the same activations: run over and over on one state, the blocks
    would add to x without end (and a part's speed would depend on the parts before it)."""
    def call():
        state.x[:] = x0
        run()
    return call


parts = {name: from_x0(run) for name, run in {
    "attention blocks": lambda: [model.decode_attention(li, state, model.work) for li in layers],
    "MLP blocks": lambda: [model.decode_mlp(li, state, model.work) for li in layers],
    "whole layers": lambda: [model.decode_layer(li, state, model.work) for li in layers],
    "LM head": lambda: model.decode_logits(state, model.work),
}.items()}
ms: dict = {}
for _ in range(args.rounds):
    for threads in (1, 2):
        numba.set_num_threads(threads)
        for name, run in parts.items():
            run()
            t0 = time.perf_counter()
            for _ in range(10):
                run()
            ms.setdefault((name, threads), []).append((time.perf_counter() - t0) / 10 * 1000)
print(f"per token, median of {args.rounds} rounds, context {args.prompt + 1}")
for name in parts:
    one, two = statistics.median(ms[(name, 1)]), statistics.median(ms[(name, 2)])
    print(f"{name:17s} 1 thread {one:6.2f} ms   2 threads {two:6.2f} ms   speedup {one / two:.2f}")
