"""`torchless bench`: llama-bench's pp and tg tests (mean ± sd over runs, in its table, as CSV or
JSON), peak memory, and how much of the memory bandwidth decoding uses. Speed on a shared
machine is noisy: compare ratios taken in one run, not absolutes."""

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
    from .kernels.membw import parallel_sum
    from .kernels.workdist import numba_threads

    buf = np.ones(nbytes // 4, np.float32)
    with numba_threads(threads):
        parallel_sum(buf, 8 * threads)  # compile and fault the pages in
        best = min(_timed(parallel_sum, buf, 8 * threads) for _ in range(repeats))
    return nbytes / best


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run_bench(model, prompt_tokens: int = 256, gen_tokens: int = 128, runs: int = 3,
              threads: int | None = None) -> dict:
    """llama-bench's two tests, `runs` times each after a warm-up: pp (a prefill of
    `prompt_tokens` random tokens into an empty context) and tg (`gen_tokens` greedy decode
    steps from an empty context); each reported as mean, standard deviation and median tok/s."""
    import numba

    if threads:
        numba.set_num_threads(threads)
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, prompt_tokens).tolist()
    state = model.new_state(max_seq_len=max(prompt_tokens, gen_tokens) + 1)
    prefill_rates, decode_rates = [], []
    for _ in range(runs + 1):  # the first run warms up compilation and page faults
        state.reset()
        t0 = time.perf_counter()
        model.prefill(state, prompt)
        prefill_rates.append(prompt_tokens / (time.perf_counter() - t0))
        state.reset()
        token = prompt[0]
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            token = int(np.argmax(model.fast_forward(state, token)))
        decode_rates.append(gen_tokens / (time.perf_counter() - t0))
    prefill_rates, decode_rates = prefill_rates[1:], decode_rates[1:]
    peak_rss = peak_rss_bytes()  # before the bandwidth probe's buffer raises it
    bytes_per_token = model.weight_bytes_per_token()
    bandwidth = measure_bandwidth(threads)
    decode = statistics.median(decode_rates)
    return {
        "threads": threads,
        "n_prompt": prompt_tokens, "n_gen": gen_tokens,
        "prefill_tok_s": statistics.median(prefill_rates),
        "decode_tok_s": decode,
        "prefill_runs": prefill_rates, "decode_runs": decode_rates,
        "peak_rss_mb": peak_rss / 1e6,
        "weight_bytes_per_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_share": bytes_per_token * decode / bandwidth,
    }


def model_info(params) -> dict:
    """llama-bench's model columns: '<arch> <size> <main type>', the tensors' bytes, the parameters."""
    from collections import Counter

    tensors = params.tensors.values()
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    by_type = Counter()
    for t in tensors:
        by_type[t.ggml_type.name] += t.nbytes
    scale = next((f"{n_params / d:.0f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K")) if n_params >= d),
                 str(n_params))
    return {"model": f"{params.config.architecture} {scale} {by_type.most_common(1)[0][0]}",
            "size_bytes": sum(t.nbytes for t in tensors), "n_params": n_params}


def _mean_sd(values) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(r: dict) -> list[dict]:
    """One row per test, in llama-bench's columns."""
    rows = []
    for test, runs in ((f"pp{r['n_prompt']}", r["prefill_runs"]), (f"tg{r['n_gen']}", r["decode_runs"])):
        mean, sd = _mean_sd(runs)
        rows.append({"model": r["model"], "size": f"{r['size_bytes'] / 2**20:.2f} MiB",
                     "params": f"{r['n_params'] / 1e6:.2f} M", "backend": "CPU (numba)",
                     "threads": r["threads"], "parallel": r.get("parallel", "none"), "test": test,
                     "t/s": f"{mean:.2f} ± {sd:.2f}", "avg_ts": mean, "stddev_ts": sd})
    return rows


_COLUMNS = ("model", "size", "params", "backend", "threads", "parallel", "test", "t/s")


def format_markdown(r: dict) -> str:
    rows = table_rows(r)
    widths = [max(len(c), *(len(str(row[c])) for row in rows)) for c in _COLUMNS]
    right = {"size", "params", "threads", "test", "t/s"}

    def line(cells):
        return "| " + " | ".join(str(v).rjust(w) if c in right else str(v).ljust(w)
                                 for c, v, w in zip(_COLUMNS, cells, widths)) + " |"
    rule = "| " + " | ".join(("-" * (w - 1) + ":") if c in right else "-" * w
                             for c, w in zip(_COLUMNS, widths)) + " |"
    return "\n".join([line(_COLUMNS), rule, *(line([row[c] for c in _COLUMNS]) for row in rows), "",
                      format_extras(r)])


def format_csv(r: dict) -> str:
    import csv
    import io

    out = io.StringIO()
    fields = [c for c in _COLUMNS if c != "t/s"] + ["avg_ts", "stddev_ts"]
    writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows(r))
    return out.getvalue().rstrip("\n")


def format_extras(r: dict) -> str:
    return "\n".join([
        f"peak RSS              {r['peak_rss_mb']:.0f} MB" + (
            "" if "peak_rss_mb_per_rank" not in r else
            f" (per rank: {', '.join(f'{mb:.0f}' for mb in r['peak_rss_mb_per_rank'])} MB)"),
        f"weights read / token  {r['weight_bytes_per_token'] / 1e6:.1f} MB",
        f"memory bandwidth      {r['bandwidth_gb_s']:.1f} GB/s (measured, {r['threads']} threads)",
        f"decode uses           {100 * r['bandwidth_share']:.0f}% of it",
    ])
