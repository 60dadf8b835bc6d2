"""The scheduler of seed 6.1: kernels cut into tasks by a WorkDistributionConfig.

Tasks run inside numba's parallel runtime, one worker per numba thread (a prange over the
workers). Each worker owns a contiguous range of tasks (its static share: task i belongs to
worker i * threads // n) and claims them one at a time with an atomic fetch-add on its range's
counter; when its range is used up it claims from the other workers' ranges the same way, so a
worker that finishes early takes tasks another would have run. (numba's own chunk size does not
give this with the omp threading layer: its `omp for` has the static schedule, so chunks are
split in fixed blocks.) Each task records the worker that ran it, and `WorkStealingStats` counts
those against the owners. Work too small to pay for a parallel region runs inline on the
caller's thread, as no task at all; the threshold comes from a measurement (`calibrate`).
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import qmatmul, qmatmul_batch
from .qmatmul import TILE, PackedWeight, _group_sums, _span_f32, _span_q4, _span_q8, reads_x_sums
from .qmatmul_batch import _float_range_f32, _float_range_q4, _float_range_q8, x_terms
from .fused import attend_heads
from .workdist import WorkDistributionConfig, WorkStealingStats

# What the fast path's kernels did since the last reset (one process-wide counter set).
GLOBAL_STATS = WorkStealingStats()

# numba's public set/get of the chunk size and thread count re-check the thread pool's start-up
# under two locks on every call (~2 us, several times per product, ~200 products per token);
# the ctypes entry points behind them are what we call per product.
try:
    from numba.np.ufunc import parallel as _nb_parallel

    _nb_parallel._launch_threads()
    _set_chunksize = _nb_parallel._set_parallel_chunksize
    _get_num_threads = _nb_parallel._get_num_threads
except (ImportError, AttributeError):  # a numba without them: the public, slower calls
    _set_chunksize, _get_num_threads = numba.set_parallel_chunksize, numba.get_num_threads


def element_pointer(context, builder, signature, args):
    """In an intrinsic's codegen whose first two arguments are a 1-D array and an index: the
    pointer to that element."""
    ary = context.make_array(signature.args[0])(context, builder, args[0])
    idx = context.cast(builder, args[1], signature.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, signature.args[0], ary, [idx])


@intrinsic
def _fetch_add(typingctx, counters, v):
    """counters[v] += 1 atomically (LLVM atomicrmw); returns the value before the add."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = element_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counters, v), codegen


@njit(nogil=True, cache=True)
def _claim(counters, ends, w):
    """The next task for worker w: its own next one (counters[w] runs from starts[w] to
    ends[w] = starts[w + 1], the tasks it owns), else the next one of another worker's range
    (stolen); -1 when none is left. Each index is claimed by exactly one fetch-add."""
    n_workers = counters.shape[0]
    for k in range(n_workers):
        v = (w + k) % n_workers
        if counters[v] < ends[v]:  # a stale read only costs one wasted fetch-add
            i = _fetch_add(counters, v)
            if i < ends[v]:
                return i
    return -1


@njit(nogil=True, cache=True, parallel=True)
def _tasks_q4(codes, scale, mn, group, x, out, bounds, owners, starts):
    runners = np.empty(owners.shape[0], np.int64)
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        s = np.empty((4, TILE), np.float32)  # _tile_*'s scratch: sums, scales, mins, 6-bit high sums
        acc = np.empty(TILE, np.float32)
        i = _claim(counters, ends, w)
        while i >= 0:
            _span_q4(codes, scale, mn, x, xs, out, bounds[i], bounds[i + 1], s, acc)
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


@njit(nogil=True, cache=True, parallel=True)
def _tasks_q8(codes, scale, mn, group, x, out, bounds, owners, starts):
    runners = np.empty(owners.shape[0], np.int64)
    xs = np.empty(max(1, x.shape[0] // group), np.float32)
    if reads_x_sums(codes, mn):
        _group_sums(x, group, xs)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        s = np.empty((4, TILE), np.float32)  # _tile_*'s scratch: sums, scales, mins, 6-bit high sums
        acc = np.empty(TILE, np.float32)
        i = _claim(counters, ends, w)
        while i >= 0:
            _span_q8(codes, scale, mn, x, xs, out, bounds[i], bounds[i + 1], s, acc)
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


@njit(nogil=True, cache=True, parallel=True)
def _tasks_f32(codes, scale, mn, group, x, out, bounds, owners, starts):
    runners = np.empty(owners.shape[0], np.int64)
    xs = np.empty(1, np.float32)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        s = np.empty((4, TILE), np.float32)  # _tile_*'s scratch: sums, scales, mins, 6-bit high sums
        acc = np.empty(TILE, np.float32)
        i = _claim(counters, ends, w)
        while i >= 0:
            _span_f32(codes, scale, mn, x, xs, out, bounds[i], bounds[i + 1], s, acc)
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


@njit(nogil=True, cache=True)
def _count_local(runners, owners):
    local = 0
    for i in range(runners.shape[0]):
        local += runners[i] == owners[i]
    return local


_TASK_KERNELS = {"q4": _tasks_q4, "q8": _tasks_q8, "f32": _tasks_f32}


class TaskPlan:
    """Task bounds for one (rows, config, threads): computed once, reused every call."""

    __slots__ = ("bounds", "n_tasks", "owners", "starts", "n_threads")

    def __init__(self, rows: int, config: WorkDistributionConfig, n_threads: int, align: int = TILE):
        self.n_threads = n_threads
        self.bounds = config.chunk_bounds(rows, align=align)
        n = self.n_tasks = len(self.bounds) - 1
        # no shared buffer of who ran what: the task functions allocate theirs per call, since
        # calls of one shape run at once from pipeline stage and tensor-parallel shard threads
        self.owners = (np.arange(n, dtype=np.int64) * n_threads) // max(n, 1)
        # worker w owns tasks starts[w]:starts[w + 1] (those with owners == w)
        self.starts = np.searchsorted(self.owners, np.arange(n_threads + 1)).astype(np.int64)


_plans: dict = {}
# Plans kept at most. Attention's are made per (rows x heads, heads per task), and a server's
# micro-batches come in every size once prompt chunks run with decode steps: past this many the
# cache starts over rather than grow for as long as the process runs.
PLANS_KEPT = 4096


def cached_plan(key, make) -> "TaskPlan":
    """The plan stored under key, made by make() the first time."""
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= PLANS_KEPT:
            _plans.clear()
        plan = _plans[key] = make()
    return plan


_inline_bytes: int | None = None


def inline_threshold_bytes() -> int:
    if _inline_bytes is None:
        calibrate()
    return _inline_bytes


@njit(nogil=True, cache=True, parallel=True)
def _empty_region(runners):
    for i in prange(runners.shape[0]):
        runners[i] = numba.get_thread_id()


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: on a shared machine the slow ones measure the neighbours."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(repeats: int = 200) -> dict:
    """Measure what a parallel region costs and how fast one thread reads weights, and set the
    inline threshold: split only work whose serial time is over twice the region's cost."""
    global _inline_bytes
    runners = np.zeros(max(1, numba.get_num_threads()), np.int64)
    previous = numba.set_parallel_chunksize(1)
    try:
        overhead = _best_time(lambda: _empty_region(runners), repeats)
    finally:
        numba.set_parallel_chunksize(previous)

    rng = np.random.default_rng(0)
    from ..quant import GGMLType, QTensor
    raw = rng.integers(0, 256, (256, 512 // 32 * 20), dtype=np.uint8)  # Q4_1, 256 x 512
    raw.reshape(256, -1, 20)[:, :, :4] = np.frombuffer(np.float16([0.01, 0.0]).tobytes(), np.uint8)
    w = qmatmul.prepare(QTensor(GGMLType.Q4_1, (256, 512), raw))
    x, out = np.ones(512, np.float32), np.empty(256, np.float32)
    bytes_per_s = raw.nbytes / _best_time(lambda: qmatmul.matvec_rows(w, x, out, 0, 256), repeats)
    _inline_bytes = int(2 * overhead * bytes_per_s)
    return {"region_overhead_s": overhead, "serial_bytes_per_s": bytes_per_s,
            "inline_threshold_bytes": _inline_bytes}


def matmul_vec_adaptive_into(weights: PackedWeight, x: np.ndarray, out: np.ndarray,
                             config: WorkDistributionConfig | None = None,
                             stats: WorkStealingStats | None = GLOBAL_STATS) -> np.ndarray:
    """out = weights @ x, cut into tasks by `config` (default: for_matmul of the shape)."""
    if not isinstance(weights, PackedWeight):
        weights = _packed(weights)
    qmatmul._check_vec(weights, x, out, 0, weights.shape[0])
    return _matvec(weights, x, out, config, stats)


def _matvec(weights: PackedWeight, x, out, config=None, stats=GLOBAL_STATS):
    """matmul_vec_adaptive_into without the argument checks: the model's hot path."""
    rows, cols = weights.shape
    n_threads = _get_num_threads()
    if n_threads == 1 or weights.nbytes < inline_threshold_bytes():
        qmatmul._KERNELS[weights.kind][0](weights.codes, weights.scale, weights.min, weights.group,
                                          x, out, 0, rows)
        return out
    plan = _matmul_plan(rows, cols, config, n_threads)
    # Chunk size one: each worker its own chunk, whatever the caller set. (The balancing itself
    # is the workers' claiming, not numba's.) Set from Python, since a compiled function that
    # sets it cannot be cached on disk.
    previous = _set_chunksize(1)
    try:
        local, _ = _TASK_KERNELS[weights.kind](weights.codes, weights.scale, weights.min, weights.group,
                                            x, out, plan.bounds, plan.owners, plan.starts)
    finally:
        _set_chunksize(previous)
    if stats is not None:
        stats.record_counts(plan.n_tasks, local)
    return out


# Batched products (M rows of X): the same plans and claiming, each task a range of tiles for
# every row of X (qmatmul_batch's float kernels: direct under 5 rows, expanded tiles from 5).

@njit(nogil=True, cache=True, parallel=True)
def _batch_float_tasks_q4(codes, scale, mn, group, X, out, bounds, owners, starts):
    xs = x_terms(codes, mn, X)
    runners = np.empty(owners.shape[0], np.int64)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        i = _claim(counters, ends, w)
        while i >= 0:
            _float_range_q4(codes, scale, mn, X, xs, out, bounds[i] // TILE, -(-bounds[i + 1] // TILE))
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


@njit(nogil=True, cache=True, parallel=True)
def _batch_float_tasks_q8(codes, scale, mn, group, X, out, bounds, owners, starts):
    xs = x_terms(codes, mn, X)
    runners = np.empty(owners.shape[0], np.int64)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        i = _claim(counters, ends, w)
        while i >= 0:
            _float_range_q8(codes, scale, mn, X, xs, out, bounds[i] // TILE, -(-bounds[i + 1] // TILE))
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


@njit(nogil=True, cache=True, parallel=True)
def _batch_float_tasks_f32(codes, scale, mn, group, X, out, bounds, owners, starts):
    xs = X[:, :0]
    runners = np.empty(owners.shape[0], np.int64)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        i = _claim(counters, ends, w)
        while i >= 0:
            _float_range_f32(codes, scale, mn, X, xs, out, bounds[i] // TILE, -(-bounds[i + 1] // TILE))
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


_BATCH_TASK_KERNELS = {"q4": _batch_float_tasks_q4, "q8": _batch_float_tasks_q8, "f32": _batch_float_tasks_f32}


def matmul_adaptive_into(weights: PackedWeight, X: np.ndarray, out: np.ndarray,
                         config: WorkDistributionConfig | None = None,
                         stats: WorkStealingStats | None = GLOBAL_STATS) -> np.ndarray:
    """out (M, rows) = X (M, cols) @ weights.T, tiles cut into tasks by `config` (default:
    for_matmul of the shape), every task for all M rows. The batched twin of _matvec."""
    qmatmul_batch.check_batch(weights, X, out)
    return _matmul(weights, X, out, config, stats)


def _matmul(weights: PackedWeight, X, out, config=None, stats=GLOBAL_STATS):
    """matmul_adaptive_into without the argument checks."""
    rows, cols = weights.shape
    if X.shape[0] == 0:
        return out
    n_threads = _get_num_threads()
    if n_threads == 1 or weights.nbytes * X.shape[0] < inline_threshold_bytes():
        qmatmul_batch.FLOAT_TILES[weights.kind](weights.codes, weights.scale, weights.min, X, out,
                                                0, weights.codes.shape[0])
        return out
    plan = _matmul_plan(rows, cols, config, n_threads)
    previous = _set_chunksize(1)  # as in _matvec
    try:
        local, _ = _BATCH_TASK_KERNELS[weights.kind](weights.codes, weights.scale, weights.min,
                                                     weights.group, X, out, plan.bounds, plan.owners,
                                                     plan.starts)
    finally:
        _set_chunksize(previous)
    if stats is not None:
        stats.record_counts(plan.n_tasks, local)
    return out


def _matmul_plan(rows: int, cols: int, config, n_threads: int) -> TaskPlan:
    return cached_plan((rows, cols, config, n_threads), lambda: TaskPlan(
        rows, config or WorkDistributionConfig.for_matmul(rows, cols), n_threads))


def matmul_vec_adaptive(weights, x: np.ndarray, config: WorkDistributionConfig | None = None,
                        stats: WorkStealingStats | None = GLOBAL_STATS) -> np.ndarray:
    rows = weights.shape[0]
    out = np.empty(rows, np.float32)
    return matmul_vec_adaptive_into(weights, np.ascontiguousarray(x, np.float32), out, config, stats)


def _packed(weights) -> PackedWeight:
    """Accept a QTensor or a float matrix too (repacked per call: for tests and one-offs)."""
    from ..quant import QTensor

    if not isinstance(weights, QTensor):
        weights = QTensor.from_float(np.ascontiguousarray(weights, np.float32))
    return qmatmul.prepare(weights)


@njit(nogil=True, cache=True, parallel=True)
def _attention_tasks(q, k_cache, v_cache, n_valid, kv_map, out, bounds, owners, starts):
    runners = np.empty(owners.shape[0], np.int64)
    counters, ends = starts[:-1].copy(), starts[1:]
    for w in prange(counters.shape[0]):
        scores = np.empty(max(1, n_valid), np.float32)
        i = _claim(counters, ends, w)
        while i >= 0:
            attend_heads(q, k_cache, v_cache, n_valid, kv_map, out, bounds[i], bounds[i + 1], scores)
            runners[i] = w
            i = _claim(counters, ends, w)
    return _count_local(runners, owners), runners


def attention_parallel_adaptive(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                                n_valid: int, kv_map: np.ndarray, out: np.ndarray,
                                config: WorkDistributionConfig | None = None,
                                scores: np.ndarray | None = None,
                                stats: WorkStealingStats | None = GLOBAL_STATS) -> np.ndarray:
    """GQA attention of one query per head over a layer's KV cache, heads cut into tasks.

    q, out: (n_heads, head_dim); k_cache, v_cache: (cache_len, n_kv_heads, head_dim), of which
    the first n_valid slots hold keys; kv_map: (n_heads,) int64, the KV head of each query head.
    """
    n_heads, head_dim = q.shape
    n_threads = _get_num_threads()
    work_bytes = 2 * n_valid * k_cache.shape[1] * head_dim * 4
    if n_threads == 1 or work_bytes < inline_threshold_bytes():
        if scores is None or scores.shape[0] < n_valid:
            scores = np.empty(max(1, n_valid), np.float32)
        attend_heads(q, k_cache, v_cache, n_valid, kv_map, out, 0, n_heads, scores)
        return out
    config = config or WorkDistributionConfig.for_attention(n_heads, n_valid)
    plan = cached_plan(("attention", n_heads, config, n_threads),
                       lambda: TaskPlan(n_heads, config, n_threads, align=1))
    previous = _set_chunksize(1)
    try:
        local, _ = _attention_tasks(q, k_cache, v_cache, n_valid, kv_map, out, plan.bounds,
                                 plan.owners, plan.starts)
    finally:
        _set_chunksize(previous)
    if stats is not None:
        stats.record_counts(plan.n_tasks, local)
    return out
