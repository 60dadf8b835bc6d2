"""float16 vs float32 packed scales, in one process: decode tok/s and greedy tokens.

    python benchmarks/bench_scale_width.py [-m smollm2] [--threads 1] [--rounds 6]

Loads the model twice: as `prepare` packs it (float16 scale bits for Q4_0/Q4_1/Q5_x/Q8_0/...)
and with those scales widened to float32 arrays (the layout before float16 scales). Alternates
the two: a 256-token random prompt, then 128 greedy decode steps (fast_forward). Prints packed MB,
median decode tok/s [min-max] over the rounds after the first, and whether the tokens agree.
Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    from torchless import Mistral, Parameters
    from torchless.kernels import qmatmul as qm

    def load(float32_scales: bool) -> Mistral:
        model = Mistral.load(Parameters.load(args.model))
        if float32_scales:
            for linear in model.linears():
                p = linear.packed
                if p.scale.dtype == np.uint16:
                    linear.__dict__["packed"] = qm.PackedWeight(
                        p.ggml_type, p.shape, p.kind, p.group, p.codes,
                        p.scale.view(np.float16).astype(np.float32), p.min.view(np.float16).astype(np.float32))
            model._fused_weights.clear()
        return model

    models = {"float16": load(False), "float32": load(True)}
    for name, model in models.items():
        print(f"{name} scales: {sum(l.packed.nbytes for l in model.linears()) / 1e6:.1f} MB packed")
    vocab = next(iter(models.values())).config.vocab_size
    prompt = list(np.random.default_rng(0).integers(0, vocab, 256))
    rates, tokens = {name: [] for name in models}, {}
    for rnd in range(args.rounds):
        for name, model in models.items():
            state = model.new_state(len(prompt) + 129)
            model.prefill(state, prompt)
            out = []
            t0 = time.perf_counter()
            for _ in range(128):
                out.append(int(np.argmax(state.logits)))
                model.fast_forward(state, out[-1])
            if rnd:
                rates[name].append(128 / (time.perf_counter() - t0))
            tokens[name] = out
    for name, v in rates.items():
        print(f"{name} scales: decode {statistics.median(v):.1f} tok/s [{min(v):.1f}-{max(v):.1f}]")
    print("greedy tokens identical:", tokens["float16"] == tokens["float32"])


if __name__ == "__main__":
    main()
