"""Groups: ThreadGroup against sums computed here, MPIGroup under a real `mpiexec`, and failures
that must end every member quickly instead of hanging."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from torchless import distributed
from torchless.distributed import (GroupAbortedError, SingleGroup, ThreadGroup, current_group,
                                   run_guarded, run_in_threads)

SCRIPTS = Path(__file__).parent / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))
import check_collectives  # noqa: E402  (the same checks run under MPI)

WORLDS = (2, 3, 4)


@pytest.mark.parametrize("world", WORLDS)
def test_thread_all_reduce_matches_sum(world):
    rng = np.random.default_rng(world)
    for n in (1, 2, world - 1, world + 1, 5, 17, 576, 4099):
        data = [rng.standard_normal(n).astype(np.float32) for _ in range(world)]
        want = data[0].copy()
        for d in data[1:]:  # rank order, as the reduce adds: the result is exact
            want += d

        def member(group):
            mine = data[group.rank].copy()
            return group.all_reduce_sum(mine)

        for got in run_in_threads(world, member, timeout=10):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("world", WORLDS)
def test_thread_group_passes_the_mpi_checks(world):
    run_in_threads(world, check_collectives.check_all, timeout=10)


@pytest.mark.parametrize("world", WORLDS)
def test_thread_all_reduce_back_to_back_with_changing_sizes(world):
    def member(group):
        bufs = {n: np.empty(n, np.float32) for n in (1, 3, 576)}
        for k in range(500):
            n = (1, 3, 576)[k % 3]
            buf = bufs[n]
            buf[:] = k + group.rank
            group.all_reduce_sum(buf)
            expected = world * k + world * (world - 1) // 2
            assert (buf == expected).all(), (group.rank, k, buf[:3], expected)

    run_in_threads(world, member, timeout=10)


def test_thread_all_reduce_allocates_nothing_after_the_first_call():
    n = 250_000  # 1 MB per array: any per-call temporary would show in the peak

    def member(group):
        buf = np.ones(n, np.float32)
        group.all_reduce_sum(buf)  # the first call allocates the shared scratch
        group.barrier()
        if group.rank == 0:
            tracemalloc.start()
        group.barrier()
        for _ in range(20):
            buf[:] = 1
            group.all_reduce_sum(buf)
        group.barrier()
        if group.rank == 0:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return peak
        return None

    peak = run_in_threads(2, member, timeout=20)[0]
    assert peak < n * 4 // 4, f"all_reduce_sum allocated {peak} bytes in 20 calls"


def test_thread_all_reduce_rejects_bad_buffers():
    group = ThreadGroup.create(2)[0]
    for bad in (np.zeros(4), np.zeros((4, 4), np.float32)[:, 1], [1.0, 2.0]):
        with pytest.raises(ValueError, match="float32"):
            group.all_reduce_sum(bad)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("where", ["all_reduce", "recv", "broadcast_object", "isend_wait"])
def test_a_failing_thread_stops_the_others_quickly(world, where):
    def member(group):
        buf = np.ones(8, np.float32)
        group.all_reduce_sum(buf)
        if group.rank == 1:
            time.sleep(0.2)  # let the others block first
            raise KeyError("broken weights")
        if where == "all_reduce":
            group.all_reduce_sum(buf)
        elif where == "recv":
            group.recv(buf, 1)
        elif where == "broadcast_object":
            group.broadcast_object(None, root=1)
        else:
            group.isend(buf, 1).wait()
        return "finished"

    start = time.monotonic()
    with pytest.raises(KeyError, match="broken weights"):  # the real failure, not the aborts
        run_in_threads(world, member, timeout=30)
    assert time.monotonic() - start < 10


def test_secondary_errors_name_the_failed_rank():
    errors = {}

    def member(group):
        try:
            if group.rank == 1:
                group.abort("out of memory")
            group.barrier()
        except GroupAbortedError as exc:
            errors[group.rank] = str(exc)

    run_in_threads(3, member, timeout=30)
    assert errors == {r: "rank 1 failed: out of memory" for r in range(3)}


def test_a_missing_member_times_out_instead_of_hanging():
    def member(group):
        if group.rank != 2:  # rank 2 never joins the reduce
            group.all_reduce_sum(np.ones(4, np.float32))

    start = time.monotonic()
    with pytest.raises(GroupAbortedError, match=r"timed out after 0.5 s in all_reduce_sum"):
        run_in_threads(3, member, timeout=0.5)
    assert time.monotonic() - start < 5


def test_recv_with_a_wrong_buffer_fails_both_sides():
    def member(group):
        if group.rank == 0:
            group.send(np.ones(4, np.float32), 1)
        else:
            group.recv(np.empty(5, np.float32), 0)

    with pytest.raises(ValueError, match="expected float32"):
        run_in_threads(2, member, timeout=30)


def test_run_guarded_reraises_the_original_on_threads():
    seen = {}

    def member(group):
        def work():
            if group.rank == 0:
                raise IndexError("bad token")
            group.barrier()

        try:
            run_guarded(group, work)
        except Exception as exc:
            seen[group.rank] = type(exc).__name__

    run_in_threads(2, member, timeout=30)
    assert seen == {0: "IndexError", 1: "GroupAbortedError"}


def test_single_group_is_an_identity():
    group = SingleGroup()
    arr = np.arange(5, dtype=np.float32)
    assert group.all_reduce_sum(arr) is arr and (arr == np.arange(5)).all()
    assert group.broadcast(arr) is arr
    assert group.broadcast_object([1, 2]) == [1, 2]
    group.barrier()
    for call in (lambda: group.send(arr, 0), lambda: group.recv(arr, 0), lambda: group.isend(arr, 1)):
        with pytest.raises(ValueError, match="cannot exchange"):
            call()
    with pytest.raises(GroupAbortedError, match="rank 0 failed: stop"):
        group.abort("stop")
    with pytest.raises(ZeroDivisionError):  # one rank: nothing to abort, the error goes through
        run_guarded(group, lambda: 1 / 0)


def test_current_group_without_mpiexec(monkeypatch):
    for var in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_current", None)
    assert type(current_group()) is SingleGroup
    assert current_group() is current_group()
    monkeypatch.setattr(distributed, "_current", None)
    monkeypatch.setenv("PMI_SIZE", "1")  # mpiexec -n 1
    assert type(current_group()) is SingleGroup


def test_import_does_not_load_mpi():
    code = "import sys, torchless.distributed as d; d.current_group(); assert 'mpi4py' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if "PMI" not in k and "OMPI" not in k}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


# --- MPI: real processes under mpiexec ---------------------------------------------------------

MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpiexec and mpi4py")


def mpirun(n: int, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    # More ranks than cores is the point on a small machine; Open MPI refuses that unless told.
    extra = ["--oversubscribe"] if "Open MPI" in version else []
    cmd = [MPIEXEC, *extra, "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives(n):
    result = mpirun(n, "check_collectives.py", str(n))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == [f"ok rank {r} of {n}" for r in range(n)]


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_current_group(n):
    result = mpirun(n, "which_group.py")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [f"MPIGroup {r} {n}" for r in range(n)]


@needs_mpi
@pytest.mark.parametrize("n,where", [(2, "all_reduce"), (3, "all_reduce"), (3, "recv")])
def test_mpi_failing_rank_ends_the_job(n, where):
    start = time.monotonic()
    result = mpirun(n, "fault.py", where, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert result.stderr.count("torchless: error: rank 1 failed: ValueError: boom on purpose") == 1, \
        result.stderr
    assert "was not stopped" not in result.stdout
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end"
