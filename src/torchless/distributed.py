"""Process groups for tensor and pipeline parallelism: one rank, threads in one process, or MPI.

Model code talks to a `Group` and never learns which kind it has (gpt-fast's tp.py, mlx-lm's
group). Failure is the design constraint: a rank that raises must end the whole job within
seconds, never leave the others blocked in a collective. So every blocking wait in a
`ThreadGroup` has a timeout and is woken by `abort`, and `run_guarded` turns an exception on an
MPI rank into `MPI_Abort`, which kills the job. A rank killed by a signal cannot say so, and the
launcher kills the others at once (MPICH's hydra with SIGKILL), so `supervise_rank` keeps a small
parent process beside each rank that waits for it and names it.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

from .errors import TorchlessError

DEFAULT_TIMEOUT = 60.0
_POLL = 0.05  # seconds between checks for an abort while blocked in send/recv


class GroupAbortedError(RuntimeError):
    """Another member of the group failed or timed out; this member cannot go on."""


class Group:
    """What model code needs from a group. Every member calls each collective, in the same order.

    all_reduce_sum(array)  in place: every member's float32 array becomes the sum over members
    send, recv, isend      point to point; recv fills a preallocated buffer; isend(...).wait()
    broadcast(array, root), broadcast_object(obj, root), barrier()
    abort(message)         end the whole group because this member failed; never returns
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray: raise NotImplementedError
    def recv(self, array_out: np.ndarray, source: int, tag: int = 0) -> np.ndarray: raise NotImplementedError
    def isend(self, array: np.ndarray, dest: int, tag: int = 0): raise NotImplementedError
    def barrier(self) -> None: raise NotImplementedError
    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray: raise NotImplementedError
    def broadcast_object(self, obj, root: int = 0): raise NotImplementedError
    def abort(self, message: str) -> None: raise NotImplementedError

    def send(self, array: np.ndarray, dest: int, tag: int = 0) -> None:
        self.isend(array, dest, tag).wait()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def _check_reduce_buffer(array) -> None:
    # Reshaping a non-contiguous array copies, which would silently drop the in-place result.
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or not array.flags.c_contiguous:
        raise ValueError("all_reduce_sum needs a C-contiguous float32 ndarray")


def _check_peer(group: Group, peer: int) -> None:
    if not 0 <= peer < group.world_size or peer == group.rank:
        raise ValueError(f"rank {group.rank} cannot exchange with rank {peer} in a group of {group.world_size}")


class SingleGroup(Group):
    """A world of one: collectives are identities, and there is nobody to send to."""

    def all_reduce_sum(self, array):
        _check_reduce_buffer(array)
        return array

    def recv(self, array_out, source, tag=0): _check_peer(self, source)
    def isend(self, array, dest, tag=0): _check_peer(self, dest)
    def barrier(self): pass
    def broadcast(self, array, root=0): return array
    def broadcast_object(self, obj, root=0): return obj

    def abort(self, message):
        raise GroupAbortedError(f"rank 0 failed: {message}")


class _Shared:
    """State every member of one ThreadGroup sees."""

    def __init__(self, world_size: int, timeout: float):
        self.timeout = timeout
        # threading.Barrier counts generations itself, so back-to-back collectives cannot mix up.
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list = [None] * world_size  # what each member publishes for the current collective
        self.lock = threading.Lock()
        self.scratch: dict[int, np.ndarray] = {}  # reduce result per size, reused by every call
        self.queues: dict[tuple[int, int, int], queue.Queue] = {}
        self.reason: str | None = None  # set once, before the barrier is broken

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
        self.barrier.abort()


def _get_or_none(q: queue.Queue, timeout: float):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


class _Request:
    def __init__(self, wait):
        self.wait = wait


class ThreadGroup(Group):
    """One member per thread of one process; arrays are exchanged through shared memory."""

    def __init__(self, shared: _Shared, rank: int, world_size: int):
        self._shared, self.rank, self.world_size = shared, rank, world_size
        self._scratch: dict[int, np.ndarray] = {}  # this member's lock-free view of shared.scratch

    @classmethod
    def create(cls, world_size: int, timeout: float = DEFAULT_TIMEOUT) -> list["ThreadGroup"]:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        shared = _Shared(world_size, timeout)
        return [cls(shared, rank, world_size) for rank in range(world_size)]

    def _aborted(self, what: str) -> GroupAbortedError:
        s = self._shared
        if s.reason is None:  # the barrier broke by itself: somebody never arrived
            s.fail(f"rank {self.rank} timed out after {s.timeout:g} s in {what}")
        return GroupAbortedError(s.reason)

    def _sync(self, what: str) -> None:
        try:
            self._shared.barrier.wait()
        except threading.BrokenBarrierError:
            raise self._aborted(what) from None

    def _block(self, wait_once, what: str):
        """Call wait_once(_POLL) until it gives a result, the group aborts, or the timeout passes."""
        deadline = time.monotonic() + self._shared.timeout
        while True:
            result = wait_once(_POLL)
            if result:
                return result
            if self._shared.reason is not None:
                raise GroupAbortedError(self._shared.reason)
            if time.monotonic() > deadline:
                raise self._aborted(what)

    def all_reduce_sum(self, array):
        _check_reduce_buffer(array)
        if self.world_size == 1:
            return array
        s, flat, n = self._shared, array.reshape(-1), array.size
        s.slots[self.rank] = flat
        self._sync("all_reduce_sum")
        parts = s.slots
        if any(p.size != n for p in parts):  # every member sees this, so all raise together
            raise ValueError(f"all_reduce_sum sizes differ across ranks: {[p.size for p in parts]}")
        result = self._scratch.get(n)
        if result is None:
            with s.lock:
                result = s.scratch.setdefault(n, np.empty(n, np.float32))
            self._scratch[n] = result
        # Each member sums its own slice, so the work is split and nothing is written twice.
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        out = result[lo:hi]
        np.add(parts[0][lo:hi], parts[1][lo:hi], out=out)
        for part in parts[2:]:
            np.add(out, part[lo:hi], out=out)
        self._sync("all_reduce_sum")
        # Safe without a third barrier: nobody writes `result` again until all pass the next first one.
        np.copyto(flat, result)
        return array

    def _queue(self, source: int, dest: int, tag: int) -> queue.Queue:
        with self._shared.lock:
            return self._shared.queues.setdefault((source, dest, tag), queue.Queue())

    def isend(self, array, dest, tag=0):
        _check_peer(self, dest)
        if not array.flags.c_contiguous:
            raise ValueError("isend needs a C-contiguous array")
        # Rendezvous, not a buffered copy: the sender waits for the receiver as MPI may, so a
        # program that would deadlock under MPI deadlocks (and times out) here too.
        done = threading.Event()
        self._queue(self.rank, dest, tag).put((array, done))
        what = f"send to rank {dest} (tag {tag})"
        return _Request(lambda: self._block(done.wait, what))

    def recv(self, array_out, source, tag=0):
        _check_peer(self, source)
        q = self._queue(source, self.rank, tag)
        data, done = self._block(lambda t: _get_or_none(q, t), f"recv from rank {source} (tag {tag})")
        if data.shape != array_out.shape or data.dtype != array_out.dtype:
            self._shared.fail(f"rank {self.rank} failed: recv got {data.dtype}{data.shape} "
                              f"from rank {source}, expected {array_out.dtype}{array_out.shape}")
            raise ValueError(self._shared.reason)
        np.copyto(array_out, data)
        done.set()
        return array_out

    def barrier(self):
        self._sync("barrier")

    def broadcast(self, array, root=0):
        self._shared.slots[self.rank] = array
        self._sync("broadcast")
        src = self._shared.slots[root]
        if any(p.shape != src.shape or p.dtype != src.dtype for p in self._shared.slots):
            raise ValueError("broadcast arrays differ in shape or dtype across ranks")
        if self.rank != root:
            np.copyto(array, src)
        self._sync("broadcast")
        return array

    def broadcast_object(self, obj, root=0):
        self._shared.slots[self.rank] = obj
        self._sync("broadcast_object")
        # A pickled copy, as MPI gives: no member may mutate another's object.
        result = obj if self.rank == root else pickle.loads(pickle.dumps(self._shared.slots[root]))
        self._sync("broadcast_object")
        return result

    def abort(self, message):
        self._shared.fail(f"rank {self.rank} failed: {message}")
        raise GroupAbortedError(f"rank {self.rank} failed: {message}")


class MPIGroup(Group):
    """The ranks of an MPI communicator (COMM_WORLD by default); buffers travel without pickling."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI  # imported here so torchless works without MPI installed
        except ImportError as exc:
            raise TorchlessError("running with MPI needs mpi4py: pip install 'torchless[mpi]'") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        if os.environ.get(FAULT_ENV):
            _inject_fault(self, os.environ[FAULT_ENV])

    def all_reduce_sum(self, array):
        _check_reduce_buffer(array)
        self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return array

    def send(self, array, dest, tag=0):
        self.comm.Send(array, dest=dest, tag=tag)

    def recv(self, array_out, source, tag=0):
        self.comm.Recv(array_out, source=source, tag=tag)
        return array_out

    def isend(self, array, dest, tag=0):
        return self.comm.Isend(array, dest=dest, tag=tag)  # mpi4py's Request has .wait()

    def barrier(self):
        self.comm.Barrier()

    def broadcast(self, array, root=0):
        self.comm.Bcast(array, root=root)
        return array

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def abort(self, message):
        sys.stderr.write(f"torchless: error: rank {self.rank} failed: {message}\n")  # one write: no interleaving
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(0.2)  # MPI_Abort kills the job at once: let mpiexec forward what we wrote first
        self.comm.Abort(1)
        os._exit(1)  # MPICH's MPI_Abort can return in the caller before the launcher kills it


FAULT_ENV = "TORCHLESS_TEST_FAULT"  # for tests only: RANK:raise:N or RANK:kill:N


def _inject_fault(group: MPIGroup, spec: str) -> None:
    """Make this rank fail at its N-th communication (any call that sends or receives through the
    group's communicator, counted from 1): `raise` raises RuntimeError, `kill` sends itself
    SIGKILL. Tests use it to fail a rank in the middle of any command; nothing else should set it."""
    try:
        rank, action, count = spec.split(":")
        rank, count = int(rank), int(count)
        if action not in ("raise", "kill"):
            raise ValueError
    except ValueError:
        raise TorchlessError(f"{FAULT_ENV}={spec!r}: expected RANK:raise:N or RANK:kill:N") from None
    if rank == group.rank:
        group.comm = _FaultyComm(group.comm, action, count)


class _FaultyComm:
    """A communicator that fails at the count-th communication through it (see _inject_fault)."""

    _COUNTED = {"Allreduce", "allreduce", "Send", "send", "Recv", "recv", "Isend", "isend", "Irecv",
                "irecv", "Barrier", "barrier", "Bcast", "bcast", "Allgather", "allgather", "Gather",
                "gather", "Sendrecv", "sendrecv"}

    def __init__(self, comm, action: str, count: int):
        self._comm, self._action, self._left = comm, action, count

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in self._COUNTED:
            return attr

        def call(*args, **kwargs):
            self._left -= 1
            if self._left == 0:
                if self._action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure ({FAULT_ENV})")
            return attr(*args, **kwargs)
        return call


_current: Group | None = None


def _launched_size() -> int | None:
    """The world size an MPI launcher put in the environment (None: PMIx alone, size unknown;
    0: not launched by one). Read before MPI is initialized, so a plain run never initializes it."""
    size = os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE"))  # MPICH/Slurm, Open MPI
    if size is not None:
        return int(size) if size.strip().isdigit() else 0
    return None if "PMIX_RANK" in os.environ else 0


def current_group() -> Group:
    """An MPIGroup when launched by mpiexec with more than one rank, else a SingleGroup."""
    global _current
    if _current is None:
        _current = SingleGroup()
        size = _launched_size()
        if size is None or size > 1:
            group = MPIGroup()  # PMIx alone names the rank but not the size
            _current = group if group.world_size > 1 else _current
    return _current


SUPERVISOR_ENV = "TORCHLESS_RANK_SUPERVISOR"  # 0: run each rank without its supervising parent
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def supervise_rank() -> None:
    """Under an MPI launcher with more than one rank (on Linux), fork: the child returns and runs
    the rank; this process stays as its parent, passes on the signals it is sent, and when the
    child ends, exits as it did. If a signal it did not pass on killed the child (SIGKILL from
    the OOM killer or a user, SIGSEGV), it first prints one line naming the rank, its pid and host,
    and the signal: by the time the launcher reports the job's end, every other rank is gone too.

    The launcher sees the parent's pid; the rank is its child, as it would be under a wrapper
    shell. Call this first, before MPI is initialized or threads are started."""
    size = _launched_size()
    if (not sys.platform.startswith("linux") or os.environ.get(SUPERVISOR_ENV, "1") == "0"
            or (size is not None and size <= 1)):
        return
    os.environ[SUPERVISOR_ENV] = "0"  # the rank, and anything it starts, is not supervised again
    rank = next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK") if k in os.environ), "?")
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        _die_with_parent(parent)
        return
    forwarded: set[int] = set()

    def forward(signum, _frame):
        forwarded.add(signum)
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    _, status = os.waitpid(child, 0)  # retried after each forwarded signal (PEP 475)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    signum = os.WTERMSIG(status)
    # Quiet when the signal was passed on from here, or asked rank 0 (the one that speaks for
    # the job: `serve` stops on SIGTERM) to stop; any other rank stopped by any signal is named.
    if signum not in forwarded and not (rank == "0" and signum in (signal.SIGTERM, signal.SIGINT)):
        try:
            name = f" ({signal.Signals(signum).name})"
        except ValueError:
            name = ""
        line = (f"torchless: rank {rank} (pid {child}, host {socket.gethostname()}) stopped: "
                f"killed by signal {signum}{name}\n")
        try:
            os.write(2, line.encode(errors="replace"))  # one write: no interleaving
        except OSError:
            pass
    if signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        if signum != signal.SIGKILL:  # end as the rank did, for the launcher (no core file)
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def _die_with_parent(parent: int) -> None:
    """In the rank: be killed if the supervising parent is (the launcher's clean-up kills only it)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TorchlessError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_guarded(group: Group, fn):
    """Return fn(); if it raises on a rank of a real group, abort the group so no rank hangs."""
    if group.world_size == 1:
        return fn()
    try:
        return fn()
    except BaseException as exc:
        if isinstance(exc, GroupAbortedError) or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
            raise  # another rank's failure, already reported; or a clean exit
        if not isinstance(exc, (TorchlessError, SystemExit)):  # a bug: its traceback is worth the noise
            traceback.print_exc()
        try:
            group.abort(_describe(exc))
        except GroupAbortedError:
            pass  # a ThreadGroup: the others now know; the original error is the one to raise
        raise


def run_in_threads(world_size: int, fn, timeout: float = DEFAULT_TIMEOUT) -> list:
    """Run fn(group) on one thread per member; return the results in rank order.

    If members fail, the first real failure is raised, not the GroupAbortedErrors that it caused.
    """
    groups = ThreadGroup.create(world_size, timeout=timeout)
    results: list = [None] * world_size
    failures: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def member(group: ThreadGroup) -> None:
        try:
            results[group.rank] = fn(group)
        except BaseException as exc:
            with lock:
                failures.append((group.rank, exc))
            if not isinstance(exc, GroupAbortedError):
                group._shared.fail(f"rank {group.rank} failed: {_describe(exc)}")

    threads = [threading.Thread(target=member, args=(g,), name=f"torchless-rank-{g.rank}", daemon=True)
               for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        real = [f for f in failures if not isinstance(f[1], GroupAbortedError)]
        rank, exc = (real or failures)[0]
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised on rank {rank} of {world_size} threads)")
        raise exc
    return results
