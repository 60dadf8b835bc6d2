"""What structured output costs: decode tok/s of one chat reply with and without a grammar.

    python benchmarks/bench_grammar.py [-m smollm2] [--threads 1] [--rounds 6]

Kinds: plain, response_format json_schema (three fields), tools with tool_choice "auto" (the
grammar waits for <tool_call>) and "required" (masked from the first token). Per kind and round,
a 1-token call (prefill + one step) and a 48-token call with the same seed, so prefill (the tool
description is ~300 tokens) is taken out: rate = (n - 1) / (t48 - t1). Medians over the rounds
after the first, the kinds alternating. Not part of CI.
"""
import argparse
import statistics
import time

import numba

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("-m", "--model", default="smollm2")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--rounds", type=int, default=6)
args = ap.parse_args()
numba.set_num_threads(args.threads)
from torchless import LLM  # noqa: E402 (after the thread count)

llm = LLM(args.model, seed=0)
schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "city": {"type": "string"}}, "required": ["name", "age", "city"]}
msgs = [{"role": "user", "content": "Describe a person as JSON with a name, an age and a city."}]
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}}]
kinds = {
    "plain": dict(),
    "json_schema": dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}),
    "tools auto": dict(tools=tools, tool_choice="auto"),
    "tools required": dict(tools=tools, tool_choice="required"),
}
def timed(max_tokens, seed, kw):
    t0 = time.perf_counter()
    out = llm.create_chat_completion(msgs, max_tokens=max_tokens, temperature=0.7, seed=seed, **kw)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]
res = {k: [] for k in kinds}
for rep in range(args.rounds):
    for k, kw in kinds.items():
        t1, _ = timed(1, rep, kw)
        tn, n = timed(48, rep, kw)
        if rep and n > 4: res[k].append((n - 1) / (tn - t1))
for k, v in res.items():
    print(f"{k:15s} decode tok/s median {statistics.median(v):6.1f} [{min(v):.1f}-{max(v):.1f}]  x plain {statistics.median(v)/statistics.median(res['plain']):.2f}")
