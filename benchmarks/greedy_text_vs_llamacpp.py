"""Greedy tokens of torchless and llama.cpp on a natural-text prompt (with the model's BOS), on
the same GGUF: how many leading tokens agree, and both continuations. compare.py's prompts are
random ids without BOS, on which small rounding differences (llama.cpp's int8 activations)
can flip the first token; this is the check on text. Needs llama-cpp-python (compare.py's
venv: ~/.cache/torchless/bench-venv/bin/python).

    python benchmarks/greedy_text_vs_llamacpp.py [-m gemma3] [--tokens 24] [--prompt TEXT]
"""

from __future__ import annotations

import argparse

import numpy as np

from torchless import InferenceState, Mistral, Parameters
from torchless.hub import resolve_model

TEXT = "The history of Paris begins with a small settlement on an island in the Seine, where"


def main() -> None:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--prompt", default=TEXT)
    args = p.parse_args()
    path = str(resolve_model(args.model))
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
    ids = llm.tokenize(args.prompt.encode(), add_bos=True)
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == args.tokens:
            break
    model = Mistral.load(Parameters.load(path))
    state = InferenceState(model.config, max_seq_len=len(ids) + args.tokens + 8)
    model.prefill(state, ids)
    ours = []
    for _ in range(args.tokens):
        ours.append(int(np.argmax(state.logits)))
        model.forward(state, ours[-1])
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), args.tokens)
    print(f"{path}: the greedy tokens agree on the first {same} of {args.tokens}")
    print("  torchless:", repr(llm.detokenize(ours).decode(errors="replace")))
    print("  llama.cpp:", repr(llm.detokenize(theirs).decode(errors="replace")))


if __name__ == "__main__":
    main()
