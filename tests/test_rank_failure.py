"""A rank that dies under `mpiexec -n 2`, by a signal or by an exception, on each launcher path:
the job ends within seconds and one line names the rank and the cause.

A rank killed by a signal cannot speak for itself, and hydra kills the other ranks at once, so
`supervise_rank` keeps a parent process beside each rank that names it. The failures are injected
with TORCHLESS_TEST_FAULT (test-only: RANK:raise:N or RANK:kill:N, at the rank's N-th group
operation), so they land in the middle of the work on every path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from torchless.distributed import FAULT_ENV

pytestmark = pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")

KILLED = "torchless: rank 1 (pid "
RAISED = "torchless: error: rank 1 failed: RuntimeError: injected failure (TORCHLESS_TEST_FAULT)"


def _run_job(args, fault, stdin="", seconds_after=15, total=180):
    """Run `mpiexec -n 2 torchless ARGS` with a fault injected; return (stdout + stderr, seconds
    from the first line naming a failed rank to the job's end)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", **{FAULT_ENV: fault})
    proc = subprocess.Popen([shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "torchless", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    named_at, lines = [], {"out": [], "err": []}

    def read(stream, key):
        for line in stream:
            lines[key].append(line)
            if "torchless: " in line and "rank 1" in line and not named_at:
                named_at.append(time.monotonic())

    readers = [threading.Thread(target=read, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, "err"), daemon=True)]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
        proc.wait(timeout=total)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ended = time.monotonic()
    for t in readers:
        t.join(10)
    text = "".join(lines["err"]) + "".join(lines["out"])
    assert proc.returncode != 0, text
    assert named_at, text
    assert ended - named_at[0] < seconds_after, text
    return text


def _check_killed(text):
    line = next(line for line in text.splitlines() if line.startswith(KILLED))
    assert line.endswith("stopped: killed by signal 9 (SIGKILL)") and ", host " in line, line
    assert text.count(KILLED) == 1, text


@pytest.mark.parametrize("spec", ["tp=2", "pp=2,mb=2"])
def test_generate_names_a_rank_killed_by_a_signal(tiny_llama_gguf, spec):
    text = _run_job(["generate", "-m", str(tiny_llama_gguf), "--parallel", spec, "--raw",
                     "--max-tokens", "100", "--temperature", "0", "Once upon a time"], "1:kill:40")
    _check_killed(text)


def test_generate_names_a_rank_that_raises(tiny_llama_gguf):
    text = _run_job(["generate", "-m", str(tiny_llama_gguf), "--parallel", "tp=2", "--raw",
                     "--max-tokens", "100", "--temperature", "0", "Once upon a time"], "1:raise:40")
    assert text.count(RAISED) == 1, text


def test_chat_names_a_rank_that_raises(tiny_llama_gguf):
    text = _run_job(["chat", "-m", str(tiny_llama_gguf), "--parallel", "tp=2", "--max-tokens", "100",
                     "--temperature", "0"], "1:raise:40", stdin="Hello\nTell me more\n")
    assert text.count(RAISED) == 1, text


def test_bench_names_a_rank_killed_by_a_signal(tiny_llama_gguf):
    text = _run_job(["bench", "-m", str(tiny_llama_gguf), "--parallel", "tp=2", "--prompt-tokens", "16",
                     "--gen-tokens", "32", "--runs", "1"], "1:kill:40")
    _check_killed(text)


# -- the supervisor alone, without a launcher ----------------------------------------------------

def _supervised(code: str, before: str = "", **env):
    env = {**os.environ, "PMI_SIZE": "2", "PMI_RANK": "1", **env}
    script = (f"import os, signal, time\n{before}\nfrom torchless.distributed import supervise_rank\n"
              f"supervise_rank()\n{code}")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)


def test_the_supervisor_names_its_rank_and_the_signal():
    r = _supervised("print(os.getpid(), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -9  # the supervisor ends as its rank did
    assert r.stderr == f"torchless: rank 1 (pid {r.stdout.strip()}, host {os.uname().nodename}) " \
                       f"stopped: killed by signal 9 (SIGKILL)\n"


def test_the_supervisor_passes_on_signals_and_exit_codes_quietly():
    r = _supervised("os.kill(os.getppid(), signal.SIGTERM)\ntime.sleep(30)")  # as mpiexec or a user would
    assert (r.returncode, r.stderr) == (-15, "")
    r = _supervised("os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)", PMI_RANK="0")  # rank 0: asked to stop
    assert (r.returncode, r.stderr) == (-15, "")
    r = _supervised("os.kill(os.getpid(), signal.SIGSEGV)")  # no core file from the supervisor
    assert r.returncode == 128 + 11 and r.stderr.endswith("stopped: killed by signal 11 (SIGSEGV)\n"), r.stderr
    r = _supervised("raise SystemExit(3)")
    assert (r.returncode, r.stderr) == (3, "")
    r = _supervised("os.kill(os.getpid(), signal.SIGKILL)", TORCHLESS_RANK_SUPERVISOR="0")  # switched off
    assert (r.returncode, r.stderr) == (-9, "")


def test_a_supervised_rank_runs_numbas_parallel_loops():
    """The CLI forks its supervisor after importing torchless.cli: numba's thread pool must not
    have started by then, or the rank dies at its first parallel loop ("fork() called from a
    process already using GNU OpenMP"), as every rank with more than one thread did."""
    code = ("import numpy as np\nfrom torchless.kernels import fused\n"
            "q = np.ones((8, 2, 4), np.float32)\nk = np.ones((8, 1, 4), np.float32)\nout = np.empty_like(q)\n"
            "fused.attend_causal_rows(q, k, k, 0, np.zeros(2, np.int64), out)\nprint(out.sum())")
    r = _supervised(code, before="import torchless.cli", NUMBA_NUM_THREADS="2")
    assert (r.returncode, r.stdout.strip()) == (0, "64.0"), r.stderr


def test_the_rank_dies_with_its_supervisor():
    r = _supervised("print(os.getpid(), flush=True)\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(30)")
    assert r.returncode == -9
    pid = int(r.stdout)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False
