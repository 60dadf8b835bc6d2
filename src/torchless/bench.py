"""`torchless bench`: prefill and decode speed, peak memory, and how much of the memory bandwidth
decoding uses. Speed on a shared machine is noisy: compare ratios taken in one run, not absolutes."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gather_per_rank(group, value: float) -> list[float]:
    """Every rank's `value`, on every rank (an all-reduce of one-hot vectors)."""
    values = np.zeros(group.world_size, np.float32)
    values[group.rank] = value
    return group.all_reduce_sum(values).tolist()


def measure_bandwidth(threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` parallel sums over a buffer far larger than L3."""
    import numba

    from .kernels.membw import parallel_sum

    buf = np.ones(nbytes // 4, np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        parallel_sum(buf, 8 * threads)  # compile and fault the pages in
        best = min(_timed(parallel_sum, buf, 8 * threads) for _ in range(repeats))
    finally:
        numba.set_num_threads(previous)
    return nbytes / best


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run_bench(model, prompt_tokens: int = 256, gen_tokens: int = 128, runs: int = 3,
              threads: int | None = None) -> dict:
    """Median over `runs` of: a `prompt_tokens` prefill, then `gen_tokens` greedy decode steps."""
    import numba

    if threads:
        numba.set_num_threads(threads)
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens).tolist()
    state = model.new_state(max_seq_len=prompt_tokens + gen_tokens + 1)
    prefill_rates, decode_rates = [], []
    for _ in range(runs + 1):  # the first run warms up compilation and page faults
        state.reset()
        t0 = time.perf_counter()
        model.prefill(state, prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(state.logits))
        for _ in range(gen_tokens):
            model.fast_forward(state, token)
            token = int(np.argmax(state.logits))
        t2 = time.perf_counter()
        prefill_rates.append(prompt_tokens / (t1 - t0))
        decode_rates.append(gen_tokens / (t2 - t1))
    prefill, decode = statistics.median(prefill_rates[1:]), statistics.median(decode_rates[1:])
    peak_rss = peak_rss_bytes()  # before the bandwidth probe's buffer raises it
    bytes_per_token = model.weight_bytes_per_token()
    bandwidth = measure_bandwidth(threads)
    return {
        "threads": threads,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss / 1e6,
        "weight_bytes_per_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_share": bytes_per_token * decode / bandwidth,
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"threads               {r['threads']}",
        f"prefill               {r['prefill_tok_s']:.1f} tok/s",
        f"decode                {r['decode_tok_s']:.1f} tok/s",
        f"parallel              {r.get('parallel', 'none')}",
        f"peak RSS              {r['peak_rss_mb']:.0f} MB" + (
            "" if "peak_rss_mb_per_rank" not in r else
            f" (per rank: {', '.join(f'{mb:.0f}' for mb in r['peak_rss_mb_per_rank'])} MB)"),
        f"weights read / token  {r['weight_bytes_per_token'] / 1e6:.1f} MB",
        f"memory bandwidth      {r['bandwidth_gb_s']:.1f} GB/s (measured, {r['threads']} threads)",
        f"decode uses           {100 * r['bandwidth_share']:.0f}% of it",
    ])
