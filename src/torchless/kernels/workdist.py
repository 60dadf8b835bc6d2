"""Work distribution (seed 6.1): how a kernel's rows are cut into tasks, and what really ran where.

The cutting lives here as plain Python; the kernels in `qmatmul` run the tasks inside numba's
parallel runtime with dynamic scheduling (a free thread takes the next task), and record which
thread ran each task so `WorkStealingStats` counts what the scheduler really did.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def numba_threads(n: int):
    """numba's thread count for the block, on the calling thread (numba keeps one per thread),
    and that thread's own count put back after."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def num_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkDistributionConfig:
    min_chunk_size: int = 64      # rows: a task smaller than this costs more to schedule than it saves
    max_chunk_size: int = 4096    # rows: larger tasks leave threads idle at the end
    tasks_per_thread: int = 4     # slack so a thread that finishes early can take another's task
    numa_aware: bool = False
    cache_line_size: int = 64
    n_threads: int = 0            # 0: num_cpus()

    def __post_init__(self):
        for name in ("min_chunk_size", "max_chunk_size", "tasks_per_thread", "cache_line_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"WorkDistributionConfig.{name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.min_chunk_size > self.max_chunk_size:
            raise ValueError(f"WorkDistributionConfig: min_chunk_size {self.min_chunk_size} > "
                             f"max_chunk_size {self.max_chunk_size}")
        if self.cache_line_size & (self.cache_line_size - 1):
            raise ValueError(f"WorkDistributionConfig.cache_line_size must be a power of two, "
                             f"got {self.cache_line_size}")
        if not isinstance(self.n_threads, int) or self.n_threads < 0:
            raise ValueError(f"WorkDistributionConfig.n_threads must be >= 0, got {self.n_threads!r}")

    @classmethod
    def default(cls) -> "WorkDistributionConfig":
        return cls()

    @property
    def threads(self) -> int:
        return self.n_threads or num_cpus()

    def n_tasks(self, total: int) -> int:
        """How many tasks `total` rows become: near threads * tasks_per_thread, within the bounds.

        Any n with total/n in [min, max] gives balanced tasks inside both bounds. When no such n
        exists (total < min, or max < 2 * min for some totals) the max bound wins: tasks of max
        rows and a smaller last one (see `chunk_bounds`).
        """
        return _n_tasks(total, self.min_chunk_size, self.max_chunk_size,
                        self.threads * self.tasks_per_thread)

    def optimal_chunk_size(self, total: int) -> int:
        """The largest task, in rows, when `total` rows are cut by this configuration."""
        return int(np.diff(self.chunk_bounds(total)).max()) if total > 0 else 0

    def chunk_bounds(self, total: int, align: int = 1) -> np.ndarray:
        """Task i covers rows [bounds[i], bounds[i+1]): contiguous, disjoint, covering [0, total).

        With align > 1 (a kernel's tile of rows), tasks start on multiples of `align` and the
        bounds are applied in whole tiles: ceil(min / align) to floor(max / align) tiles each.
        Every task but the last (which ends at `total`) stays inside those bounds; so with min
        and max multiples of `align` (or align = 1), inside [min, max]. Where some task count
        n splits the tiles within both bounds, the tasks are balanced (sizes differ by at most
        one tile) and the last is inside the bounds too, up to its cut final tile. Where none
        does, the max bound wins: tasks of max, then a smaller remainder.
        """
        units = -(-total // align)
        lo = -(-self.min_chunk_size // align)
        hi = max(lo, self.max_chunk_size // align)
        n = _n_tasks(units, lo, hi, self.threads * self.tasks_per_thread)
        if n * lo <= units:  # balanced: units/n lies in [lo, hi]
            bounds = (np.arange(n + 1, dtype=np.int64) * units) // max(n, 1)
        else:  # n = ceil(units / hi) tasks, all of hi units but the last
            bounds = np.append(np.arange(n, dtype=np.int64) * hi, units)
        return np.minimum(bounds * align, total)

    @classmethod
    def for_matmul(cls, rows: int, cols: int, **kw) -> "WorkDistributionConfig":
        """Chunks sized by the work in a row: between 16 Ki and 128 Ki weights a task (10 to
        80 KiB of Q4_1), about 8 tasks a thread. Measured with benchmarks/bench_workdist.py on
        the 2-core AMD machine: tasks of 32-64 rows of a 4096-wide matrix beat 512-row ones by
        10%, and SmolLM2's 576-wide matrices want one 32-row tile a task."""
        min_rows = max(1, min(rows, -(-16384 // max(cols, 1))))
        max_rows = max(min_rows, min(4096, 131072 // max(cols, 1)))
        kw.setdefault("tasks_per_thread", 8)
        return cls(min_chunk_size=min_rows, max_chunk_size=max_rows, **kw)

    @staticmethod
    def attention_units_per_task(n_heads: int, seq_len: int) -> int:
        """Heads a task of for_attention takes at least: more when the sequence is short."""
        return max(1, min(n_heads, 256 // max(seq_len, 1)))

    @classmethod
    def for_attention(cls, n_heads: int, seq_len: int, **kw) -> "WorkDistributionConfig":
        """One head is the unit; short sequences group heads so a task is not all overhead."""
        per_task = cls.attention_units_per_task(n_heads, seq_len)
        return cls(min_chunk_size=per_task, max_chunk_size=max(per_task, n_heads), **kw)


def _n_tasks(total: int, lo: int, hi: int, target: int) -> int:
    if total <= 0:
        return 0
    fewest = -(-total // hi)
    most = max(fewest, total // lo)
    return min(max(target, fewest), most)


class WorkStealingStats:
    """What the scheduler really did. Each task has an owner under a static split (task i of n
    belongs to thread i * threads // n); a task run by its owner is local, else stolen."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.tasks_created = 0
            self.local_tasks = 0
            self.stolen_tasks = 0

    def record(self, runners: np.ndarray, n_threads: int):
        """runners[i]: the thread that ran task i."""
        n = len(runners)
        owners = (np.arange(n) * n_threads) // max(n, 1)
        self.record_counts(n, int(np.count_nonzero(runners == owners)))

    def record_counts(self, n_tasks: int, n_local: int):
        with self._lock:
            self.tasks_created += n_tasks
            self.local_tasks += n_local
            self.stolen_tasks += n_tasks - n_local

    def steal_ratio(self) -> float:
        with self._lock:
            return self.stolen_tasks / self.tasks_created if self.tasks_created else 0.0

    def __repr__(self):
        return (f"WorkStealingStats(tasks_created={self.tasks_created}, local={self.local_tasks}, "
                f"stolen={self.stolen_tasks})")


_MPOL_INTERLEAVE = 3


class NumaHint:
    """Where memory and workers should live. Real on multi-node Linux; elsewhere a recorded no-op.

    `applied` says whether the hint took effect and `reason` why not.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.nodes = _numa_nodes()
        self.applied = False
        self.reason = "not applied yet"

    @classmethod
    def local(cls) -> "NumaHint":
        """Pin this process's threads to the CPUs of the node it runs on now."""
        hint = cls("local")
        if len(hint.nodes) < 2:
            hint.reason = f"single NUMA node ({len(hint.nodes)} found): nothing to pin"
            return hint
        cpu = os.sched_getcpu() if hasattr(os, "sched_getcpu") else 0
        for cpus in hint.nodes.values():
            if cpu in cpus:
                try:
                    os.sched_setaffinity(0, cpus)
                    hint.applied, hint.reason = True, f"pinned to CPUs {sorted(cpus)}"
                except OSError as e:
                    hint.reason = f"sched_setaffinity refused: {e}"
        return hint

    @classmethod
    def interleaved(cls) -> "NumaHint":
        return cls("interleaved")

    def apply_to(self, array: np.ndarray) -> bool:
        """Ask the kernel to interleave `array`'s pages over all nodes (mbind); for weights."""
        if self.mode != "interleaved":
            return False
        if len(self.nodes) < 2:
            self.reason = f"single NUMA node ({len(self.nodes)} found): nothing to interleave"
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start = array.ctypes.data // page * page
        length = array.ctypes.data + array.nbytes - start
        mask = ctypes.c_ulong(sum(1 << n for n in self.nodes))
        # mbind is syscall 237 on x86-64; glibc has no wrapper (it lives in libnuma).
        rc = libc.syscall(237, ctypes.c_void_p(start), ctypes.c_ulong(length), _MPOL_INTERLEAVE,
                          ctypes.byref(mask), ctypes.c_ulong(64), 0)
        if rc != 0:
            self.reason = f"mbind refused: {os.strerror(ctypes.get_errno())}"
            return False
        self.applied, self.reason = True, f"interleaved over nodes {sorted(self.nodes)}"
        return True

    def __repr__(self):
        return f"NumaHint({self.mode!r}, applied={self.applied}, reason={self.reason!r})"


def _numa_nodes() -> dict[int, set[int]]:
    """{node: cpus} from /sys/devices/system/node; empty where there is no such directory."""
    nodes = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        try:
            nodes[int(d.name[4:])] = _parse_cpulist((d / "cpulist").read_text())
        except (OSError, ValueError):
            continue
    return nodes


def _parse_cpulist(text: str) -> set[int]:
    cpus = set()
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.update(range(int(a), int(b) + 1))
        elif part:
            cpus.add(int(part))
    return cpus
