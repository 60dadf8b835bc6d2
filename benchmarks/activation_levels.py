"""How far int8 activation levels move the LM head's logits: why the batched integer kernels
that torchless had (see kernels/qmatmul_batch) carried each activation as three int8 levels,
not llama.cpp's one, and why its batched products are float32 now.

For --tokens random prompt ids, the final-normed hidden state of every position (what the LM
head reads) is quantized per group of 32 as the kernels do (level k: round(residual / step),
step = max|x| / 127 / 254^k, clipped to +-127), and the head's float64 logits from it are
compared with those from the exact hidden state. Prints the largest |logit error| for 1, 2
and 3 levels; the parity gate against transformers is 2e-3.

    python benchmarks/activation_levels.py [-m smollm2] [--tokens 30]
"""

from __future__ import annotations

import argparse

import numpy as np

from torchless import InferenceState, Mistral, Parameters
from torchless.hub import resolve_model
from torchless.kernels import qmatmul as qm


def levels(x: np.ndarray, n: int, group: int = 32) -> np.ndarray:
    x = x.astype(np.float32).reshape(-1, group)
    step = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    out = np.zeros_like(x)
    for _ in range(n):
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(step > 0, np.clip(np.rint((x - out) / step), -127, 127), 0)
        out += q * step
        step = step / np.float32(254)
    return out.reshape(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--tokens", type=int, default=30)
    args = p.parse_args()
    path = resolve_model(args.model)
    model = Mistral.load(Parameters.load(path))
    head = qm.dequantize_rows(model.output.packed, 0, model.output.packed.rows).astype(np.float64)
    ids = np.random.default_rng(0).integers(100, min(5000, model.config.vocab_size), args.tokens)
    hidden = model.hidden_states(InferenceState(model.config, max_seq_len=args.tokens + 8), ids)
    worst = {n: 0.0 for n in (1, 2, 3)}
    for h in hidden:
        exact = head @ h.astype(np.float64)
        for n in worst:
            worst[n] = max(worst[n], float(np.abs(head @ levels(h, n).astype(np.float64) - exact).max()))
    spread = float(np.abs(hidden).max() / np.sqrt((hidden.astype(np.float64) ** 2).mean()))
    print(f"{path.name}: {len(hidden)} positions, max |h| / rms(h) = {spread:.1f}")
    for n, err in worst.items():
        print(f"  {n} level{'s' if n > 1 else ''}: max |logit error| {err:.2e}")


if __name__ == "__main__":
    main()
