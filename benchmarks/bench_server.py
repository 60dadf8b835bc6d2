"""Load test of `torchless serve` with the official openai client.

    python benchmarks/bench_server.py [-m smollm2] [--clients 16] [--seconds 60] [--max-tokens 64] [--no-http]
                                      [--parallel pp=2,mb=2] [--threads N] [--prefix-cache-mb MB]

Starts the server as a subprocess on a free port, then: one client alone for --solo-seconds
(the baseline), and --clients concurrent streaming clients for --seconds, each sending request
after request. Reports requests completed, errors, p50/p95 time to first token, aggregate
generated tok/s against the one-client figure, and the server's RSS at start and end (psutil).

With --no-http the same traffic (the same chat prompts through the model's template, the same
sampling and max_tokens, one client alone and then --clients) goes straight to the server's
engine thread (`server.engine.EngineThread`) in this process, with no HTTP, no event loop and
no client library: what the engine gives on this traffic, for the HTTP figures to be read
against. Not part of CI.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["Write a short story about a robot.", "Explain how rain forms.", "List five fruits.",
           "What is the capital of Italy?", "Describe a sunset.", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "Tell me about the moon."]


REQUEST_NUMBERS = itertools.count()  # over every client of the run (next() holds the GIL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def client_loop(base: str, until: float, max_tokens: int, seed: int, out: dict, lock) -> None:
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    i = seed
    while time.monotonic() < until:
        # Each request its own: a request number first, so a prefix cache finds only what
        # real chat traffic shares (the chat template's system prompt), not a repeated prompt.
        prompt = f"Request {next(REQUEST_NUMBERS)}. {PROMPTS[i % len(PROMPTS)]}"
        i += 1
        t0 = time.monotonic()
        ttft, tokens = None, 0
        try:
            stream = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0.7, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.monotonic() - t0
                if getattr(chunk, "usage", None):
                    tokens = chunk.usage.completion_tokens
            with lock:
                out["done"] += 1
                out["tokens"] += tokens
                out["ttft"].append(ttft if ttft is not None else time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - counted and shown, never hidden
            with lock:
                out["errors"] += 1
                out["error_examples"].append(repr(e)[:200])


def engine_client_loop(llm, engine, until: float, max_tokens: int, seed: int, out: dict, lock) -> None:
    """client_loop without HTTP: each request a Sequence handed to the engine thread, its prompt
    ids made as the server makes them (app.py) and its sampling the server's reading of what
    client_loop sends (OpenAI's defaults, temperature 0.7)."""
    import queue

    from torchless.server.engine import Request

    sampling = dict(temperature=0.7, top_p=1.0, top_k=0, min_p=0.0)
    i = seed
    while time.monotonic() < until:
        prompt = f"Request {next(REQUEST_NUMBERS)}. {PROMPTS[i % len(PROMPTS)]}"
        i += 1
        ids = llm._prompt_ids(llm._render_chat([{"role": "user", "content": prompt}]), template=True)
        seq = llm._sequence(ids, 0, sampling, max_tokens, None)
        events, t0, first = queue.Queue(), time.monotonic(), []

        def emit(text, reason, entries=(), first=first, t0=t0, events=events):
            if text and not first:
                first.append(time.monotonic() - t0)
            if reason is not None:
                events.put(reason)

        engine.submit(Request(seq, emit, prompt=ids))
        reason = events.get()
        with lock:
            if reason.startswith("error"):
                out["errors"] += 1
                out["error_examples"].append(reason[:200])
                continue
            out["done"] += 1
            out["tokens"] += seq.completion_tokens
            out["ttft"].append(first[0] if first else time.monotonic() - t0)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one by default)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_clients(base, n: int, seconds: float, max_tokens: int, server_pid: int) -> dict:
    """n clients for `seconds`; also the CPU seconds the clients (this process) and the server
    used meanwhile: on a small machine the load generator takes cores from the server. base:
    the server's URL, or (llm, engine thread) to go to the engine without HTTP (--no-http)."""
    out = {"done": 0, "tokens": 0, "errors": 0, "ttft": [], "error_examples": []}
    cpu0, server_cpu0 = cpu_seconds(), cpu_seconds(server_pid)
    lock = threading.Lock()
    until = time.monotonic() + seconds
    t0 = time.monotonic()
    loop, to = (client_loop, (base,)) if isinstance(base, str) else (engine_client_loop, base)
    threads = [threading.Thread(target=loop, args=(*to, until, max_tokens, i, out, lock))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.monotonic() - t0
    out["client_cpu"] = cpu_seconds() - cpu0
    out["server_cpu"] = cpu_seconds(server_pid) - server_cpu0
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--solo-seconds", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--parallel", default=None, help="passed to torchless serve (e.g. pp=2,mb=2)")
    p.add_argument("--threads", type=int, default=None, help="passed to torchless serve")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="passed to torchless serve (0: the prefix cache off)")
    p.add_argument("--no-http", action="store_true",
                   help="the same traffic to the server's engine thread in this process (see above)")
    args = p.parse_args(argv)
    if args.no_http:
        return report(args, *engine_only(args))

    port = free_port()
    cmd = [sys.executable, "-m", "torchless", "serve", "-m", args.model, "--port", str(port),
           "--max-batch", str(args.max_batch)] + (["--parallel", args.parallel] if args.parallel else []) \
        + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--prefix-cache-mb", str(args.prefix_cache_mb)] if args.prefix_cache_mb is not None else [])
    server = subprocess.Popen(cmd, stderr=open(os.devnull, "w"))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not come up")
                time.sleep(0.5)
        run_clients(base, 1, 3, 8, server.pid)  # warm up: compile the batch kernels
        rss_start = rss_mb(server.pid)
        solo = run_clients(base, 1, args.solo_seconds, args.max_tokens, server.pid)
        samples, sampling = [], threading.Event()

        def sample_rss():  # every 10 s under load: growth that levels off vs growth that does not
            while not sampling.wait(10):
                samples.append(rss_mb(server.pid))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        load = run_clients(base, args.clients, args.seconds, args.max_tokens, server.pid)
        sampling.set()
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    report(args, solo, load, rss_start, rss_end, samples)


def engine_only(args) -> tuple:
    """--no-http: one client alone, then --clients, against an EngineThread in this process."""
    import numba

    from torchless import LLM
    from torchless.server.engine import EngineThread

    if args.parallel:
        raise SystemExit("--no-http runs one local engine: leave out --parallel")
    if args.threads:
        numba.set_num_threads(args.threads)
    llm = LLM(args.model, **({} if args.prefix_cache_mb is None
                             else {"prefix_cache_bytes": int(args.prefix_cache_mb * 2**20)}))
    llm.engine.scheduler.max_batch = args.max_batch
    engine = EngineThread(llm.engine)
    me = os.getpid()
    try:
        run_clients((llm, engine), 1, 3, 8, me)  # warm up: compile the batch kernels
        rss_start = rss_mb(me)
        solo = run_clients((llm, engine), 1, args.solo_seconds, args.max_tokens, me)
        load = run_clients((llm, engine), args.clients, args.seconds, args.max_tokens, me)
        return solo, load, rss_start, rss_mb(me), []
    finally:
        engine.close()


def report(args, solo, load, rss_start, rss_end, samples) -> None:
    solo_rate = solo["tokens"] / solo["wall"]
    rate = load["tokens"] / load["wall"]
    q = statistics.quantiles(load["ttft"], n=20) if len(load["ttft"]) >= 2 else [float("nan")] * 19
    print(f"model {args.model}; {args.clients} streaming clients for {args.seconds:.0f} s, "
          f"max_tokens {args.max_tokens}, server --max-batch {args.max_batch}"
          + ("; no HTTP: the engine thread in process" if args.no_http else ""))
    print(f"requests completed   {load['done']}")
    print(f"errors               {load['errors']}" + (f"  e.g. {load['error_examples'][0]}" if load["errors"] else ""))
    print(f"time to first token  p50 {statistics.median(load['ttft']):.2f} s, p95 {q[18]:.2f} s")
    print(f"generated            {rate:.1f} tok/s aggregate; one client alone {solo_rate:.1f} tok/s "
          f"({rate / solo_rate:.2f}x)")
    for name, run in (("one client", solo), (f"{args.clients} clients", load)):
        if args.no_http:  # one process: the engine's and the clients' CPU are not apart
            cores = f"engine and clients {run['server_cpu'] / run['wall']:.2f}"
        else:
            cores = f"server {run['server_cpu'] / run['wall']:.2f} cores, clients {run['client_cpu'] / run['wall']:.2f}"
        print(f"CPU, {name:11} {cores} cores (of {os.cpu_count()})")
    print(f"server RSS           {rss_start:.0f} MB at start, {rss_end:.0f} MB at end"
          + (f"; every 10 s under load: {', '.join(f'{mb:.0f}' for mb in samples)}" if samples else ""))


if __name__ == "__main__":
    main()
