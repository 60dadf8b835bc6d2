"""The server's memory across hostile load: RSS before, during and after a few hundred bad requests.

    python benchmarks/bench_hostile_server.py                       # smollm2, 300 hostile requests
    python benchmarks/bench_hostile_server.py -m model.gguf -n 600 --concurrency 8
    python benchmarks/bench_hostile_server.py --env MALLOC_ARENA_MAX=2   # compare allocator settings

It starts `torchless serve` in a subprocess, warms it with a few normal requests (so compiled
kernels and caches are in the baseline), then sends the hostile mix below from --concurrency
threads while sampling the server's RSS (/proc/PID/status) every 50 ms, then waits, sends a few
normal requests again, and prints RSS at each point and the status codes each kind got.
A server that gets its memory back ends near "before"; one that keeps what bad requests made
it allocate ends near "peak".
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def post(port: int, path: str, body: bytes, headers=None, timeout=60) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def raw(port: int, data: bytes, read=True, timeout=30) -> int | str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            if not read:
                return "sent"
            reply = s.recv(4096)
            return int(reply.split()[1]) if reply.startswith(b"HTTP/") else "closed"
    except OSError as e:
        return type(e).__name__


def stream_then_disconnect(port: int) -> int | str:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "stream": True}).encode()
    return raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # reads the first bytes, then closes


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


# name -> function(port) returning a status code or the error's name
HOSTILE = {
    "deep JSON (200k levels)": lambda p: post(p, "/v1/completions", b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "deep JSON in messages": lambda p: post(p, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000 + b"}]}"),
    "huge body (16 MB)": lambda p: post(p, "/v1/completions", b'{"prompt": "' + b"a" * (16 << 20) + b'"}'),
    "prompt at the body limit": lambda p: post(p, "/v1/completions", _j({"prompt": "word " * 200_000, "max_tokens": 1})),
    "lone surrogate prompt": lambda p: post(p, "/v1/completions", b'{"prompt": "\\ud800 hi", "max_tokens": 2}'),
    "lone surrogate content": lambda p: post(p, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    "lone surrogate role": lambda p: post(p, "/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "x"}]}'),
    "bad field types": lambda p: post(p, "/v1/completions", _j({"prompt": ["a", 3, None], "max_tokens": "many", "temperature": -1})),
    "bad messages": lambda p: post(p, "/v1/chat/completions", _j({"messages": [{"role": "user"}, 7, {"content": {"x": 1}}]})),
    "unknown fields": lambda p: post(p, "/v1/completions", _j({"prompt": "x", **{f"field{i}": i for i in range(10_000)}})),
    "many stop strings": lambda p: post(p, "/v1/completions", _j({"prompt": "x", "max_tokens": 2, "stop": ["ab" * 50] * 10_000})),
    "many prompts": lambda p: post(p, "/v1/completions", _j({"prompt": ["hello"] * 100, "max_tokens": 1})),
    "empty prompt": lambda p: post(p, "/v1/completions", _j({"prompt": "", "max_tokens": 2})),
    "not JSON": lambda p: post(p, "/v1/completions", b"\xff\xfe" * 1000),
    "stream, then disconnect": stream_then_disconnect,
    "Content-Length + chunked": lambda p: raw(p, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "headers, then disconnect": lambda p: raw(p, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",
                                              read=False),
}

NORMAL = _j({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-n", "--requests", type=int, default=300, help="hostile requests in all (default 300)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the load (default 5)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2)")
    args = ap.parse_args()

    port = _free_port()
    env = dict(os.environ, **dict(item.split("=", 1) for item in args.env))
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would block the server once full
    server = subprocess.Popen([sys.executable, "-m", "torchless", "serve", "-m", args.model, "--port", str(port),
                               "--threads", str(args.threads)], env=env, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"the server ended: {log.read()}")
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("the server did not come up")
                time.sleep(0.3)
        rows = [("started", rss_mb(server.pid))]
        for _ in range(5):
            assert post(port, "/v1/completions", NORMAL) == 200
        rows.append(("after 5 normal requests (before)", rss_mb(server.pid)))

        peak, stop = [0.0], threading.Event()

        def sample():
            while not stop.wait(0.05):
                try:
                    peak[0] = max(peak[0], rss_mb(server.pid))
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        kinds = list(HOSTILE)
        statuses: dict[str, Counter] = defaultdict(Counter)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            jobs = [(kinds[i % len(kinds)], pool.submit(HOSTILE[kinds[i % len(kinds)]], port))
                    for i in range(args.requests)]
            for kind, job in jobs:
                statuses[kind][job.result()] += 1
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
        rows.append((f"peak during {args.requests} hostile requests", peak[0]))
        rows.append(("right after", rss_mb(server.pid)))
        time.sleep(args.settle)
        ok = [post(port, "/v1/completions", NORMAL) for _ in range(5)]
        rows.append((f"{args.settle:g} s later, after 5 normal requests", rss_mb(server.pid)))

        print(f"model {args.model}, {args.requests} hostile requests from {args.concurrency} threads "
              f"in {elapsed:.1f} s; normal requests after: {Counter(ok)}")
        if args.env:
            print(f"server environment: {' '.join(args.env)}")
        print(f"\n{'':44}{'RSS MB':>8}")
        for name, value in rows:
            print(f"{name:44}{value:8.0f}")
        print(f"\n{'kind':32}statuses")
        for kind in kinds:
            print(f"{kind:32}{dict(statuses[kind])}")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.seek(0)
        lines = log.read().splitlines()
        errors = Counter(line[:160] for line in lines if line.startswith(("Traceback", "ERROR")) or "Error:" in line)
        if errors:
            print(f"\nserver stderr: {sum(errors.values())} error lines, {len(errors)} distinct:")
            for line, n in errors.most_common(8):
                print(f"  {n:4}  {line}")


if __name__ == "__main__":
    sys.exit(main())
