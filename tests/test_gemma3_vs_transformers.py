"""The real Gemma 3 270M (Q4_K_M GGUF, `gemma3-270m`) against transformers loading the same file.

transformers dequantizes the GGUF (gguf-py) into a torch model, so both sides run the same
weights; torchless runs them quantized (its products dequantize on the fly) in float32. The
reference runs in float32 and in float64 (the same model cast, CPU torch): float64 is the exact
answer for these weights, so the error measured against it is torchless's own, and float32
transformers against float64 shows what another float32 implementation of the model gets.

What must agree, and how closely (the error is max |ours - ref| / max |ref| over the logits):

- the last position's logits on three prompts (plain text, code, the chat template): within
  REL_SHORT = 2e-5 of either reference. A float32 pass through 18 layers is off by about 1e-6 of
  the largest logit (measured: 0.9e-6 to 1.5e-6 against float64, as float32 transformers is:
  0.7e-6 to 1.3e-6), so 2e-5 leaves room for another CPU's order of summation, while anything
  wrong in the model (the embedding scale, a norm, RoPE's base, the window) moves them by 1e-3
  or more.
- 32 greedy tokens from each prompt (our compiled decode path), identical to both references'.
- on a ~1000-token text (twice the local layers' 512-token window, so their rings wrap): every
  position's logits within REL_LONG = 1e-4 of float32 transformers (the error grows with the
  context: measured 4.5e-6), and the perplexity within 0.5% (measured: equal to 6 digits).

The token ids are transformers' tokenizer's, and ours must give the same. Each model is loaded
once for the module; float64 runs the short prompts only, where it is cheap (the 1000-token pass
would cost half a minute more on two cores and tell nothing the float32 one does not).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from torchless import InferenceState, Mistral, Parameters

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<start_of_turn>user\nWhat is 12 * 7?<end_of_turn>\n<start_of_turn>model\n",
]
REL_SHORT = 2e-5
REL_LONG = 1e-4
GREEDY = 32

# A fixed text of about a thousand tokens for the perplexity gate.
PERPLEXITY_TEXT = """\
Lighthouses are among the oldest working machines that people still rely on. The earliest were
nothing more than fires kept burning on hilltops near dangerous harbours, tended through the night
by watchmen who were paid in grain or in coins collected from passing ships. The most famous of the
ancient lights stood on the island of Pharos at the entrance to the harbour of Alexandria. It was
built in the third century before the common era, rose more than a hundred metres above the sea,
and was said to be visible from a day's sailing away. Earthquakes damaged it again and again over
the centuries, and by the fourteenth century only ruins remained, but its name survives in the word
for lighthouse in several European languages.

For a very long time the light itself changed little. Wood gave way to coal, and coal to candles and
oil lamps, but the flame was still a small source of light that spread in every direction, most of
it wasted on the sky and the land behind the tower. Keepers polished brass reflectors to send more
of the light out to sea, and in the eighteenth century engineers began to shape those reflectors as
parabolas, which gathered the light of a lamp into a beam. The improvement was real, yet the
reflectors tarnished quickly in the salt air, and a great deal of the lamp's output was still lost.

The decisive change came in 1822, when the French physicist Augustin Fresnel presented a new kind of
lens. Instead of one thick piece of glass, which would have been enormously heavy and would have
absorbed much of the light passing through it, Fresnel arranged many thin rings of glass around a
central lens, each ring cut at the angle needed to bend the light towards the horizon. Prisms above
and below the rings caught the rays that would otherwise have escaped upwards or downwards and turned
them outwards as well. A lamp inside such a lens could be seen from more than twenty nautical miles
away, and within a few decades Fresnel lenses had been installed along coasts all over the world.
They were graded into orders by size, from the great first order lenses, taller than a person, used
on major headlands, to the small sixth order lenses that marked harbour entrances and rivers.

A light that can be seen is only useful if sailors know which light they are looking at. On a dark
night, with no other landmarks in view, one steady light looks very much like another. So each
lighthouse was given its own character: a pattern of flashes, eclipses and colours that mariners could
look up in printed lists. One light might show a single white flash every five seconds, another two
red flashes every ten, a third a steady beam interrupted by a short darkness. Rotating lenses, turned
by clockwork driven by falling weights, produced the flashes, and the keepers had to wind the
mechanism by hand every few hours through the night. The heavy lens assemblies often floated in
troughs of mercury so that the clockwork could turn them smoothly.

Fog was a different problem. A light that carries twenty miles on a clear night may vanish within a
few hundred metres in thick fog, exactly when ships most need a warning. Lighthouses therefore gained
bells, whistles, sirens and finally powerful horns driven by compressed air, each sounding its own
pattern of blasts. Later still came radio beacons, which allowed a ship with the right receiver to
take a bearing on a station far beyond the range of any light or sound.

The life of a keeper was one of routine and isolation. The lamp had to be lit at sunset and put out
at sunrise, the wick trimmed, the fuel topped up, the lens cleaned of soot and salt, and the log book
kept up to date with the weather and the ships that passed. On rock stations far out at sea, keepers
lived for weeks at a time in small rooms stacked inside the tower, with supplies brought by boat when
the weather allowed. Storms could cut them off for much longer, and the stories of keepers who
rescued shipwrecked sailors, or who kept the light burning through illness and exhaustion, became a
part of the folklore of many coastal communities.

During the twentieth century electricity replaced oil, automatic switches replaced the keepers'
watch, and one by one the lighthouses were automated. Today satellite navigation tells a ship its
position to within a few metres, anywhere on the ocean, and many people wonder whether lighthouses
are needed at all. Yet receivers fail, power is lost and charts contain errors, and a light on a
headland remains a simple and reliable check that does not depend on anything but a lamp and a
pair of eyes. Many towers are still maintained for that reason, while others have become museums,
holiday cottages or simply landmarks, reminders of a time when a small flame on a rock could mean the
difference between a safe arrival and a wreck.
"""


@pytest.fixture(scope="module")
def hf(gemma3_path):
    """(tokenizer, float32 model, float64 model): transformers loading the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gemma3_path.name)
    tok = AutoTokenizer.from_pretrained(gemma3_path.parent, **kw)
    model32 = AutoModelForCausalLM.from_pretrained(gemma3_path.parent, dtype="float32", **kw).eval()
    model64 = copy.deepcopy(model32).to(torch.float64)
    return tok, model32, model64


@pytest.fixture(scope="module")
def params(gemma3_path):
    return Parameters.load(gemma3_path)


@pytest.fixture(scope="module")
def ours(params):
    return Mistral.load(params)


def rel_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_greedy(model, ids, n):
    """n greedy steps through transformers' KV cache, by hand: generate() would stop at EOS.
    The cache is `cache` in transformers 5, `past_key_values` before."""
    import inspect

    import torch

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            cache = step.cache if key == "cache" else step.past_key_values
            step = model(torch.tensor([[out[-1]]]), use_cache=True, **{key: cache})
    return out


def our_greedy(model, ids, n):
    """n greedy steps as a user's decode runs them (the compiled one-token path)."""
    state = InferenceState(model.config, max_seq_len=256)
    model.prefill(state, ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(state.logits)))
        model.fast_forward(state, out[-1])
    return out


def perplexity(logits, ids, rows=64):
    """exp(mean negative log-likelihood of each next token), in float64, a few rows at a time
    (the logits of 1000 tokens over 262144 words are 1 GB in float32)."""
    nll = []
    for start in range(0, len(ids) - 1, rows):
        x = logits[start:min(start + rows, len(ids) - 1)].astype(np.float64)
        top = x.max(-1)
        logz = np.log(np.exp(x - top[:, None]).sum(-1)) + top
        nll.append(logz - x[np.arange(len(x)), ids[start + 1:start + 1 + len(x)]])
    return float(np.exp(np.concatenate(nll).mean()))


def test_the_file_is_the_pinned_one(gemma3_path, ours):
    from torchless.hub import KNOWN_MODELS

    assert gemma3_path.name == KNOWN_MODELS["gemma3-270m"].filename
    c = ours.config
    assert (c.architecture, c.n_layers, c.hidden_size, c.sliding_window) == ("gemma3", 18, 640, 512)
    assert sum(c.sliding_layers) == 15 and c.final_logit_softcap is None  # 5 local : 1 global


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "code", "chat"])
def test_last_logits_and_greedy_continuation(hf, params, ours, prompt):
    import torch

    tok, model32, model64 = hf
    ids = tok.encode(prompt)  # with <bos>, as the file asks
    assert ids[0] == 2 and params.tokenizer.encode(prompt) == ids
    with torch.no_grad():
        ref32 = model32(torch.tensor([ids])).logits[0, -1].numpy()
        ref64 = model64(torch.tensor([ids])).logits[0, -1].numpy()
    state = InferenceState(ours.config, max_seq_len=256)
    ours.prefill(state, ids)
    err32, err64, hf_err = rel_error(state.logits, ref32), rel_error(state.logits, ref64), rel_error(ref32, ref64)
    print(f"\n{prompt!r} ({len(ids)} tokens): max rel err vs float32 {err32:.2e}, vs float64 {err64:.2e} "
          f"(transformers float32 vs float64: {hf_err:.2e}); max |diff| vs float64 "
          f"{np.abs(state.logits - ref64).max():.2e}")
    assert err32 < REL_SHORT and err64 < REL_SHORT

    ours_tokens = our_greedy(ours, ids, GREEDY)
    assert ours_tokens == hf_greedy(model32, ids, GREEDY)
    assert ours_tokens == hf_greedy(model64, ids, GREEDY)


def test_long_text_logits_and_perplexity(hf, params, ours):
    import torch

    tok, model32, _ = hf
    ids = tok.encode(PERPLEXITY_TEXT)
    assert 900 < len(ids) < 1200 and params.tokenizer.encode(PERPLEXITY_TEXT) == ids
    with torch.no_grad():
        ref = model32(torch.tensor([ids])).logits[0].numpy()
    state = InferenceState(ours.config, max_seq_len=2048)
    mine = ours.prefill(state, ids, all_logits=True)

    err = rel_error(mine, ref)
    ppl_ours, ppl_ref = perplexity(mine, ids), perplexity(ref, ids)
    print(f"\n{len(ids)} tokens: max rel err {err:.2e} (last position {rel_error(mine[-1], ref[-1]):.2e}); "
          f"perplexity: torchless {ppl_ours:.5f}, transformers {ppl_ref:.5f}")
    assert err < REL_LONG
    assert abs(ppl_ours - ppl_ref) / ppl_ref < 0.005
