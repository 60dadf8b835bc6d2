"""The real SmolLM2 Q4_1 file against transformers running its dequantized float32 weights."""

from __future__ import annotations

import numpy as np
import pytest

from torchless import InferenceState, Mistral, Parameters

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
]

# A fixed text of a few hundred tokens for the perplexity gate.
PERPLEXITY_TEXT = (
    "The history of computing is a story of ever smaller machines doing ever more work. Early "
    "computers filled whole rooms and consumed enormous amounts of power, yet they could only perform "
    "a few thousand operations per second. Engineers worked in shifts to replace failing vacuum tubes, "
    "and programs were entered by hand with switches or punched cards. The invention of the transistor "
    "changed everything: it was smaller, cheaper and far more reliable than the tube it replaced. Within "
    "two decades integrated circuits placed thousands, then millions, of transistors on a single chip. "
    "Personal computers arrived in homes and offices, and software became an industry of its own. "
    "Networks connected these machines, first within universities and laboratories, then across the "
    "world. Today a phone in a pocket holds more computing power than all the machines of the nineteen "
    "sixties combined, and it spends most of that power drawing pictures, playing music and sending "
    "messages to friends. Researchers now train language models on vast collections of text, and those "
    "models can answer questions, write stories and translate between languages. Whether such systems "
    "understand what they say remains a matter of lively debate among philosophers and scientists."
)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype="float32", **kw).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return Mistral.load(Parameters.load(smollm2_path))


def hf_greedy(model, ids, n):
    """Greedy by hand: generate() would stop at EOS, and we compare all n steps."""
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def our_greedy(model, ids, n):
    state = InferenceState(model.config, max_seq_len=512)
    model.prefill(state, ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(state.logits)))
        model.forward(state, out[-1])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_logits_and_greedy_continuation(hf, ours, prompt):
    import torch

    tok, model = hf
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    state = InferenceState(ours.config, max_seq_len=512)
    ours.prefill(state, ids)
    diff = np.abs(state.logits - ref).max()
    print(f"max |logit diff| = {diff:.2e} on {prompt!r}")
    assert diff < 2e-3
    assert our_greedy(ours, ids, 32) == hf_greedy(model, ids, 32)


def test_perplexity_within_half_a_percent(hf, ours):
    import torch

    tok, model = hf
    ids = tok.encode(PERPLEXITY_TEXT, add_special_tokens=False)
    assert len(ids) > 200
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0].numpy()
    state = InferenceState(ours.config, max_seq_len=512)
    our_logits = ours.prefill(state, ids, all_logits=True)

    def perplexity(logits):
        logits = logits[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))

    ppl_ours, ppl_ref = perplexity(our_logits), perplexity(ref_logits)
    print(f"perplexity: torchless {ppl_ours:.4f}, transformers {ppl_ref:.4f}")
    assert abs(ppl_ours - ppl_ref) / ppl_ref < 0.005
