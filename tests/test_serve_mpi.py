"""Serving and chatting across MPI ranks: rank 0 serves HTTP (or reads stdin) and schedules,
every rank runs its part of each step. The oracle is `LLM` in one process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from torchless import LLM

from test_server import _free_port, concurrent_greedy_texts

PROMPTS = ["Hello", "Once upon a time", "1, 2, 3,", "The quick brown fox"]


def _launch(n, model, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.Popen([shutil.which("mpiexec"), "-n", str(n), sys.executable, "-m", "torchless",
                             *args, "-m", str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_healthy(base, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the server did not come up")


def _end(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=30)


def _rank_pids(port: int) -> dict[int, int]:
    """pid of each rank of the server on `port`, from /proc (MPICH puts PMI_RANK in the env).
    Each rank runs as the child of a small supervising process with the same command line and
    environment (distributed.supervise_rank): the rank is the one whose parent is its twin."""
    found = {}  # pid -> (rank, parent pid)
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if b"torchless" in cmd and str(port).encode() in cmd:
            for item in env:
                if item.startswith(b"PMI_RANK="):
                    found[int(entry.name)] = (int(item.split(b"=")[1]), ppid)
    return {rank: pid for pid, (rank, ppid) in found.items() if found.get(ppid, (None,))[0] == rank}


@pytest.mark.parametrize("spec", ["tp=2", "pp=2,mb=2"])
def test_mpi_server_gives_each_request_the_text_of_one_process(tiny_llama_gguf, spec):
    alone = LLM(str(tiny_llama_gguf))
    expected = [alone(p, max_tokens=8, temperature=0)["choices"][0]["text"] for p in PROMPTS]
    port = _free_port()
    proc = _launch(2, tiny_llama_gguf, "serve", "--port", str(port), "--parallel", spec)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, proc)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert concurrent_greedy_texts(client, PROMPTS, 8) == expected
        chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == alone.create_chat_completion(
            [{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
        start = time.monotonic()
        os.kill(_rank_pids(port)[0], signal.SIGTERM)  # rank 0 stops and releases the others
        proc.wait(timeout=30)
        assert time.monotonic() - start < 15
        _, err = proc.communicate()
        # uvicorn re-raises the SIGTERM once it has shut down, so the job ends by that signal
        assert proc.returncode in (0, 15, 143) and "Traceback" not in err, err
    finally:
        _end(proc)


def test_a_rank_that_dies_ends_the_server_with_a_message(tiny_llama_gguf):
    port = _free_port()
    proc = _launch(2, tiny_llama_gguf, "serve", "--port", str(port), "--parallel", "tp=2")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        pid = _rank_pids(port)[1]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - start < 15
        out, err = proc.communicate()
        # rank 1's supervising parent names it; mpiexec (MPICH's hydra) ends the job
        assert proc.returncode != 0, out + err
        assert f"torchless: rank 1 (pid {pid}, host " in err and "killed by signal 9 (SIGKILL)" in err, out + err
    finally:
        _end(proc)


def test_chat_under_mpi_reads_stdin_on_rank_zero_and_ends(tiny_llama_gguf):
    """Only rank 0 reads stdin; the others follow its steps and end with it (this hung)."""
    proc = _launch(2, tiny_llama_gguf, "chat", "--parallel", "tp=2", "--temperature", "0",
                   "--max-tokens", "6")
    try:
        out, err = proc.communicate("Hello\n", timeout=120)
    finally:
        _end(proc)
    assert proc.returncode == 0, err
    alone = LLM(str(tiny_llama_gguf))
    reply = alone.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=6,
                                         temperature=0)["choices"][0]["message"]["content"]
    assert out.strip() == reply.strip()
