"""Work distribution (seed 6.1): how rows are cut into tasks, that every row is computed once,
that the statistics count what the scheduler really did, and that a slowed worker's tasks are
taken by the other one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from torchless.kernels import adaptive, qmatmul
from torchless.kernels.ops import attention
from torchless.kernels.workdist import (NumaHint, WorkDistributionConfig, WorkStealingStats,
                                        _parse_cpulist, num_cpus)
from torchless.quant import GGMLType, QTensor

TILE = qmatmul.TILE
HYP = settings(max_examples=150, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------------
# helpers
def random_weight(kind: str, rows: int, cols: int, seed: int = 0) -> QTensor:
    """A valid random tensor: F32, or Q4_1 / Q8_0 blocks with small random f16 scales."""
    rng = np.random.default_rng(seed)
    if kind == "F32":
        return QTensor.from_float(rng.standard_normal((rows, cols)).astype(np.float32))
    t = GGMLType[kind]
    bsize = {"Q4_1": 20, "Q8_0": 34}[kind]
    raw = rng.integers(0, 256, (rows, cols // 32, bsize), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, (rows, cols // 32)).astype(np.float16)
    raw[..., 0:2] = d.view(np.uint8).reshape(rows, cols // 32, 2)
    if kind == "Q4_1":
        m = rng.uniform(-0.1, 0.1, (rows, cols // 32)).astype(np.float16)
        raw[..., 2:4] = m.view(np.uint8).reshape(rows, cols // 32, 2)
    return QTensor(t, (rows, cols), raw.reshape(rows, -1))


@pytest.fixture
def two_threads(monkeypatch):
    """Two numba threads, and tasks even for small work (inline threshold 0)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    monkeypatch.setattr(adaptive, "_inline_bytes", 0)
    yield
    numba.set_num_threads(previous)


configs = st.builds(
    lambda lo, extra, tpt, nt: WorkDistributionConfig(min_chunk_size=lo, max_chunk_size=lo + extra,
                                                      tasks_per_thread=tpt, n_threads=nt),
    st.integers(1, 600), st.integers(0, 3000), st.integers(1, 8), st.integers(0, 8))


def sizes_of(bounds):
    return np.diff(bounds)


def assert_partition(bounds, total, align):
    assert bounds.dtype.kind == "i"
    assert bounds[0] == 0 and bounds[-1] == total
    sizes = sizes_of(bounds)
    assert (sizes > 0).all(), bounds  # contiguous, disjoint, none empty
    assert (bounds[:-1] % align == 0).all(), bounds  # tasks start on a tile


# --------------------------------------------------------------------------------------------
# 1. every row exactly once
@HYP
@given(config=configs, rows=st.integers(1, 5000), align=st.sampled_from([1, 32]))
def test_chunk_bounds_partition(config, rows, align):
    bounds = config.chunk_bounds(rows, align=align)
    assert_partition(bounds, rows, align)
    if align == 1:
        assert len(bounds) - 1 == config.n_tasks(rows)


@HYP
@given(config=configs, rows=st.integers(1, 5000), kind=st.sampled_from(["F32", "Q4_1", "Q8_0"]),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_every_row_once(two_threads, config, rows, kind, seed):
    cols = 64
    qt = random_weight(kind, rows, cols, seed)
    w = qmatmul.prepare(qt)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    stats = WorkStealingStats()
    adaptive.matmul_vec_adaptive_into(w, x, out, config, stats)
    ref_w = qt.dequantize().astype(np.float64)
    ref = ref_w @ x
    tol = 1e-5 * (np.abs(ref_w) @ np.abs(x)) + 1e-6
    assert not np.isnan(out).any()
    assert (np.abs(out - ref) <= tol).all(), np.max(np.abs(out - ref) - tol)
    # the kernel really ran the tasks this configuration cuts (tile-aligned)
    assert stats.tasks_created == len(config.chunk_bounds(rows, align=TILE)) - 1


# --------------------------------------------------------------------------------------------
# 2. both bounds honoured
@HYP
@given(config=configs, rows=st.integers(1, 5000))
def test_bounds_align_1(config, rows):
    lo, hi = config.min_chunk_size, config.max_chunk_size
    sizes = sizes_of(config.chunk_bounds(rows))
    assert (sizes <= hi).all()
    assert (sizes[:-1] >= lo).all()  # all but the last, always
    if -(-rows // hi) <= rows // lo:  # some n has rows / n in [lo, hi]
        assert (sizes >= lo).all(), sizes
        assert sizes.max() - sizes.min() <= 1  # and then balanced


@HYP
@given(lo_tiles=st.integers(1, 40), extra_tiles=st.integers(0, 100), tpt=st.integers(1, 8),
       nt=st.integers(0, 8), rows=st.integers(1, 5000))
def test_bounds_align_32(lo_tiles, extra_tiles, tpt, nt, rows):
    lo, hi = 32 * lo_tiles, 32 * (lo_tiles + extra_tiles)
    config = WorkDistributionConfig(min_chunk_size=lo, max_chunk_size=hi, tasks_per_thread=tpt,
                                    n_threads=nt)
    bounds = config.chunk_bounds(rows, align=32)
    assert_partition(bounds, rows, 32)
    sizes = sizes_of(bounds)
    assert ((sizes[:-1] >= lo) & (sizes[:-1] <= hi)).all(), (lo, hi, sizes)
    assert sizes[-1] <= hi


def test_bounds_regressions():
    # 5 tiles, min = max = 2 tiles: no balanced split; the max bound wins, the short task last
    c = WorkDistributionConfig(min_chunk_size=64, max_chunk_size=64)
    assert list(c.chunk_bounds(160, align=32)) == [0, 64, 128, 160]
    assert list(c.chunk_bounds(100)) == [0, 64, 100]
    # a balanced split exists: sizes differ by at most one tile
    c = WorkDistributionConfig(min_chunk_size=64, max_chunk_size=128, tasks_per_thread=1, n_threads=2)
    assert list(sizes_of(c.chunk_bounds(320, align=32))) == [96, 96, 128]


# --------------------------------------------------------------------------------------------
# 3. statistics
def _attention_inputs(rng, n_heads, n_kv, head_dim, cache_len):
    q = rng.standard_normal((n_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((cache_len, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((cache_len, n_kv, head_dim)).astype(np.float32)
    kv_map = (np.arange(n_heads) // (n_heads // n_kv)).astype(np.int64)
    return q, k, v, kv_map


def test_stats_count_what_ran(two_threads):
    rng = np.random.default_rng(0)
    stats = WorkStealingStats()
    expected = 0
    mats = [(qmatmul.prepare(random_weight(kind, r, c, seed=i)), None) for i, (kind, r, c) in
            enumerate([("Q4_1", 576, 576), ("Q8_0", 1000, 64), ("F32", 200, 96), ("Q4_1", 1536, 576)])]
    mats.append((mats[0][0], WorkDistributionConfig(min_chunk_size=32, max_chunk_size=32)))
    q, k, v, kv_map = _attention_inputs(rng, 9, 3, 64, 40)
    att_out = np.empty_like(q)
    for call in range(60):
        w, config = mats[call % len(mats)]
        x = rng.standard_normal(w.shape[1]).astype(np.float32)
        adaptive.matmul_vec_adaptive_into(w, x, np.empty(w.shape[0], np.float32), config, stats)
        used = config or WorkDistributionConfig.for_matmul(*w.shape)
        expected += len(used.chunk_bounds(w.shape[0], align=TILE)) - 1
        n_valid = 1 + call % 40
        acfg = WorkDistributionConfig(min_chunk_size=1, max_chunk_size=2) if call % 2 else None
        adaptive.attention_parallel_adaptive(q, k, v, n_valid, kv_map, att_out, acfg, stats=stats)
        used = acfg or WorkDistributionConfig.for_attention(9, n_valid)
        expected += len(used.chunk_bounds(9)) - 1
    assert stats.tasks_created == expected
    assert stats.tasks_created == stats.local_tasks + stats.stolen_tasks
    assert stats.local_tasks >= 0 and stats.stolen_tasks >= 0
    assert 0.0 <= stats.steal_ratio() <= 1.0
    stats.reset()
    assert (stats.tasks_created, stats.local_tasks, stats.stolen_tasks) == (0, 0, 0)
    assert stats.steal_ratio() == 0.0


@pytest.mark.parametrize("kind", ["F32", "Q4_1", "Q8_0", "attention", "Q4_1 batch", "Q8_0 batch"])
def test_runners_are_workers_and_local_is_counted(two_threads, kind):
    """Each task records the worker that ran it (in a buffer of its call's own); local = tasks
    run by their static owner, and the stats count exactly the plan's tasks."""
    n_threads = numba.get_num_threads()
    config = WorkDistributionConfig(min_chunk_size=32, max_chunk_size=32)
    rng = np.random.default_rng(1)
    for call in range(20):
        stats = WorkStealingStats()
        if kind == "attention":
            q, k, v, kv_map = _attention_inputs(rng, 32, 8, 16, 30)
            config = WorkDistributionConfig(min_chunk_size=1, max_chunk_size=1)
            adaptive.attention_parallel_adaptive(q, k, v, 30, kv_map, np.empty_like(q), config,
                                                 stats=stats)
            plan = adaptive._plans[("attention", 32, config, n_threads)]
            local, runners = adaptive._attention_tasks(q, k, v, 30, kv_map, np.empty_like(q),
                                                       plan.bounds, plan.owners, plan.starts)
        else:
            w = qmatmul.prepare(random_weight(kind.split()[0], 1000, 64, seed=call))
            if kind.endswith("batch"):
                X = rng.standard_normal((1 + call % 9, 64)).astype(np.float32)
                out = np.empty((len(X), 1000), np.float32)
                adaptive.matmul_adaptive_into(w, X, out, config, stats)
                plan = adaptive._plans[(1000, 64, config, n_threads)]
                local, runners = adaptive._BATCH_TASK_KERNELS[w.kind](
                    w.codes, w.scale, w.min, w.group, X, out, plan.bounds, plan.owners, plan.starts)
            else:
                x = rng.standard_normal(64).astype(np.float32)
                out = np.empty(1000, np.float32)
                adaptive.matmul_vec_adaptive_into(w, x, out, config, stats)
                plan = adaptive._plans[(1000, 64, config, n_threads)]
                local, runners = adaptive._TASK_KERNELS[w.kind](
                    w.codes, w.scale, w.min, w.group, x, out, plan.bounds, plan.owners, plan.starts)
        assert stats.tasks_created == plan.n_tasks == len(plan.bounds) - 1
        assert stats.tasks_created == stats.local_tasks + stats.stolen_tasks
        assert len(runners) == plan.n_tasks
        assert ((runners >= 0) & (runners < n_threads)).all(), runners
        assert local == np.count_nonzero(runners == plan.owners)
        # owners: the static split, task i to worker i * threads // n
        n = len(plan.owners)
        assert list(plan.owners) == [i * n_threads // n for i in range(n)]


def test_batched_products_from_two_threads(two_threads):
    """Concurrent batched calls of one shape: right results, and tasks_created == local + stolen
    exactly, with the counts of the plan's tasks per call."""
    qt = random_weight("Q4_1", 1536, 576, seed=5)
    w = qmatmul.prepare(qt)
    ref_w = qt.dequantize().astype(np.float64)
    stats = WorkStealingStats()
    n_tasks = len(WorkDistributionConfig.for_matmul(1536, 576).chunk_bounds(1536, align=TILE)) - 1
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((8, 576)).astype(np.float32)
        out = np.empty((8, 1536), np.float32)
        for _ in range(30):
            adaptive.matmul_adaptive_into(w, X, out, None, stats)
            if not np.allclose(out, X @ ref_w.T, rtol=1e-3, atol=1e-3):
                errors.append(seed)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert stats.tasks_created == 2 * 30 * n_tasks
    assert stats.tasks_created == stats.local_tasks + stats.stolen_tasks


def test_stats_record_from_runners():
    s = WorkStealingStats()
    s.record(np.array([0, 0, 1, 1]), 2)  # all by their owners
    s.record(np.array([1, 0, 1, 1]), 2)  # task 0 (owner 0) ran on 1
    assert (s.tasks_created, s.local_tasks, s.stolen_tasks) == (8, 7, 1)
    assert s.steal_ratio() == 1 / 8


def test_stats_thread_safe():
    s = WorkStealingStats()
    n_threads, n_calls = 8, 20000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races would show
    try:
        barrier = threading.Barrier(n_threads)

        def work():
            barrier.wait()
            for _ in range(n_calls):
                s.record_counts(3, 1)

        ts = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    total = n_threads * n_calls
    assert (s.tasks_created, s.local_tasks, s.stolen_tasks) == (3 * total, total, 2 * total)


def test_stats_record_holds_the_lock():
    """Under CPython's GIL the three += of record_counts rarely interleave, so the test above
    cannot see a missing lock: check directly that recording waits for the lock."""
    s = WorkStealingStats()
    done = threading.Event()
    with s._lock:
        t = threading.Thread(target=lambda: (s.record_counts(5, 2), done.set()))
        t.start()
        assert not done.wait(0.2)  # blocked while the lock is held
        assert s.tasks_created == 0
    assert done.wait(10)
    t.join()
    assert (s.tasks_created, s.local_tasks, s.stolen_tasks) == (5, 2, 3)


def test_kernels_from_several_threads(two_threads):
    """nogil kernels called from several Python threads at once: right results, exact counts."""
    qt = random_weight("Q4_1", 1536, 576, seed=3)
    w = qmatmul.prepare(qt)
    ref_w = qt.dequantize().astype(np.float64)
    stats = WorkStealingStats()
    n_tasks = len(WorkDistributionConfig.for_matmul(1536, 576).chunk_bounds(1536, align=TILE)) - 1
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        out = np.empty(1536, np.float32)
        for _ in range(50):
            x = rng.standard_normal(576).astype(np.float32)
            adaptive.matmul_vec_adaptive_into(w, x, out, None, stats)
            if not np.allclose(out, ref_w @ x, rtol=1e-4, atol=1e-4):
                errors.append(seed)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert stats.tasks_created == 4 * 50 * n_tasks
    assert stats.tasks_created == stats.local_tasks + stats.stolen_tasks


# --------------------------------------------------------------------------------------------
# 4. a slowed worker's tasks are stolen
def _set_affinity_all(cpus_main, cpus_others):
    """Pin this thread (numba's worker 0 when it calls a kernel) and all other threads."""
    me = threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus_main if int(tid) == me else cpus_others)
        except OSError:  # a thread that has just exited
            pass


def _steal_run(w, x, out, config, calls):
    stats = WorkStealingStats()
    for _ in range(calls):
        adaptive.matmul_vec_adaptive_into(w, x, out, config, stats)
    return stats


@pytest.mark.skipif(num_cpus() < 2 or not hasattr(os, "sched_setaffinity"),
                    reason="needs two CPUs and sched_setaffinity")
def test_slowed_worker_tasks_are_stolen(two_threads):
    """Worker 0 (the calling thread) shares its CPU with a spinning process; worker 1 has a CPU
    to itself. With dynamic balancing worker 1 takes tasks of worker 0's range."""
    if numba.get_num_threads() < 2:
        pytest.skip("numba has fewer than two threads")
    qt = random_weight("Q4_1", 8192, 1024, seed=5)
    w = qmatmul.prepare(qt)
    x = np.random.default_rng(6).standard_normal(1024).astype(np.float32)
    out = np.empty(8192, np.float32)
    config = WorkDistributionConfig(min_chunk_size=32, max_chunk_size=32)  # 256 tasks
    ref = adaptive.matmul_vec_adaptive_into(w, x, np.empty(8192, np.float32), config, None).copy()

    original = os.sched_getaffinity(0)
    a, b = sorted(original)[:2]
    baseline = _steal_run(w, x, out, config, 100)
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{a}}})\n"
                                "while True: pass"])
    try:
        time.sleep(0.2)  # let it start spinning
        _set_affinity_all({a}, {b})
        slowed = WorkStealingStats()
        for _ in range(10):  # up to 10 rounds of 50 calls; one round suffices in practice
            s = _steal_run(w, x, out, config, 50)
            slowed.record_counts(s.tasks_created, s.local_tasks)
            if slowed.stolen_tasks > 0 and slowed.tasks_created >= 200 * 256:
                break
    finally:
        _set_affinity_all(original, original)
        spinner.kill()
        spinner.wait()
    np.testing.assert_array_equal(out, ref)  # stealing changes who, not what
    print(f"\nsteal ratio: {baseline.steal_ratio():.3f} unslowed ({baseline}), "
          f"{slowed.steal_ratio():.3f} with worker 0 slowed ({slowed})")
    assert slowed.tasks_created == slowed.local_tasks + slowed.stolen_tasks
    assert slowed.stolen_tasks > 0


# --------------------------------------------------------------------------------------------
# 5. invalid configurations
@pytest.mark.parametrize("kw", [
    dict(min_chunk_size=128, max_chunk_size=64),
    dict(min_chunk_size=0), dict(max_chunk_size=0), dict(tasks_per_thread=0),
    dict(cache_line_size=0), dict(min_chunk_size=-1), dict(max_chunk_size=-5),
    dict(tasks_per_thread=-2), dict(cache_line_size=-64), dict(min_chunk_size=1.5),
    dict(max_chunk_size="64"), dict(tasks_per_thread=2.0), dict(cache_line_size=48),
    dict(cache_line_size=96), dict(n_threads=-1), dict(n_threads=1.0), dict(n_threads=None),
])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        WorkDistributionConfig(**kw)


def test_valid_config_defaults():
    c = WorkDistributionConfig.default()
    assert (c.min_chunk_size, c.max_chunk_size, c.tasks_per_thread, c.numa_aware,
            c.cache_line_size) == (64, 4096, 4, False, 64)
    assert c.threads == num_cpus()
    assert WorkDistributionConfig(n_threads=3).threads == 3


# --------------------------------------------------------------------------------------------
# 6. for_matmul / for_attention / optimal_chunk_size
@HYP
@given(rows=st.integers(0, 300000), cols=st.integers(0, 100000), nt=st.integers(0, 64))
def test_for_matmul_valid(rows, cols, nt):
    c = WorkDistributionConfig.for_matmul(rows, cols, n_threads=nt)
    assert 1 <= c.min_chunk_size <= c.max_chunk_size
    if rows:
        for align in (1, TILE):
            assert_partition(c.chunk_bounds(rows, align=align), rows, align)
        assert c.optimal_chunk_size(rows) == sizes_of(c.chunk_bounds(rows)).max()


@HYP
@given(n_heads=st.integers(1, 256), seq_len=st.integers(0, 200000), nt=st.integers(0, 64))
def test_for_attention_valid(n_heads, seq_len, nt):
    c = WorkDistributionConfig.for_attention(n_heads, seq_len, n_threads=nt)
    assert 1 <= c.min_chunk_size <= c.max_chunk_size
    bounds = c.chunk_bounds(n_heads)
    assert_partition(bounds, n_heads, 1)
    assert (sizes_of(bounds) >= c.min_chunk_size).all()  # a split within the bounds exists
    assert c.optimal_chunk_size(n_heads) == sizes_of(bounds).max()


@HYP
@given(config=configs, total=st.integers(0, 100000))
def test_optimal_chunk_size_consistent(config, total):
    bounds = config.chunk_bounds(total)
    assert len(bounds) - 1 == config.n_tasks(total)
    if total == 0:
        assert config.optimal_chunk_size(0) == 0 and list(bounds) == [0]
    else:
        assert config.optimal_chunk_size(total) == sizes_of(bounds).max()
        assert config.optimal_chunk_size(total) <= config.max_chunk_size


# --------------------------------------------------------------------------------------------
# 7. NUMA hints
def test_numa_hint_single_node():
    from torchless.kernels.workdist import _numa_nodes

    nodes = _numa_nodes()
    if len(nodes) >= 2:
        pytest.skip("multi-node machine")
    before = os.sched_getaffinity(0)
    local = NumaHint.local()
    assert local.applied is False and "single" in local.reason
    assert os.sched_getaffinity(0) == before
    inter = NumaHint.interleaved()
    arr = np.zeros(1 << 20, np.uint8)
    assert inter.apply_to(arr) is False
    assert inter.applied is False and "single" in inter.reason
    assert local.apply_to(arr) is False  # a local hint interleaves nothing
    assert "applied=False" in repr(inter)


def test_numa_nodes_match_sysfs():
    from torchless.kernels.workdist import _numa_nodes

    nodes = _numa_nodes()
    if not os.path.isdir("/sys/devices/system/node"):
        assert nodes == {}
        return
    for n, cpus in nodes.items():
        with open(f"/sys/devices/system/node/node{n}/cpulist") as f:
            assert cpus == _parse_cpulist(f.read())


@pytest.mark.parametrize("text,cpus", [
    ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}), ("0\n", {0}), ("", set()), ("5-5", {5}),
    ("0-1,4-5\n", {0, 1, 4, 5}),
])
def test_parse_cpulist(text, cpus):
    assert _parse_cpulist(text) == cpus


# --------------------------------------------------------------------------------------------
# 8. attention
@pytest.mark.parametrize("forced", [True, False], ids=["tasks", "inline"])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,cache_len", [
    (9, 3, 64, 50), (8, 8, 32, 17), (32, 8, 128, 64), (4, 1, 16, 5)])
def test_attention_matches_reference(monkeypatch, forced, n_heads, n_kv, head_dim, cache_len):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    monkeypatch.setattr(adaptive, "_inline_bytes", 0 if forced else 1 << 62)
    try:
        rng = np.random.default_rng(n_heads * 1000 + cache_len)
        q, k, v, kv_map = _attention_inputs(rng, n_heads, n_kv, head_dim, cache_len)
        for n_valid in sorted({1, 2, cache_len // 2 or 1, cache_len - 1 or 1, cache_len}):
            for config in (None, WorkDistributionConfig(min_chunk_size=1, max_chunk_size=1)):
                stats = WorkStealingStats()
                out = np.full_like(q, np.nan)
                adaptive.attention_parallel_adaptive(q, k, v, n_valid, kv_map, out, config,
                                                     stats=stats)
                mask = np.ones((1, n_valid), bool)
                ref = attention(q[None], k[:n_valid], v[:n_valid], mask, kv_map)[0]
                np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
                assert (stats.tasks_created > 0) == (forced and numba.get_num_threads() > 1)
    finally:
        numba.set_num_threads(previous)


def test_the_plan_cache_is_bounded_and_remakes_what_it_dropped(monkeypatch):
    """Attention plans are made per (rows x heads, heads per task): a server whose micro-batches
    mix prompt chunks of every length would add plans for as long as it runs. Past PLANS_KEPT
    the cache starts over, and a dropped plan comes back equal when asked for again."""
    from torchless.kernels import fused_layer

    monkeypatch.setattr(adaptive, "_plans", {})
    monkeypatch.setattr(adaptive, "PLANS_KEPT", 8)
    first = fused_layer.attention_plan(9, 40, 2**40, None, 2)
    for units in range(10, 40):
        fused_layer.attention_plan(units, 40, 2**40, None, 2)
        assert len(adaptive._plans) <= 8
    again = fused_layer.attention_plan(9, 40, 2**40, None, 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
