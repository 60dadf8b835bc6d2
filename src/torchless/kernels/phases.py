"""A decoder layer as one parallel region: its products and attention as phases of tasks.

Why: run as one parallel region per product, a decode step at 2 threads started and joined
~240 regions per token (8 per layer on SmolLM2), each a fork and a join of numba's thread team
plus the idle time of whichever worker finished first, and held the GIL between them; the
attention block, whose products are small, gained 1.2-1.3x from a second thread and the MLP
block 1.6x, against the LM head's 2x (benchmarks/profile_blocks.py). Here a whole layer is one
region (`layer_phases`): every worker enters it once and runs its phases in order, and the only
synchronization is a wait at the end of each phase for its tasks to be done.

Measured on SmolLM2 Q4_1 at 256 positions (2-vCPU VM, cycle counters in a copy of
`layer_phases`): a layer takes ~270 us at 2 threads against ~410 at 1 (1.5x); the region costs
~11 us of it before its workers start. What is left is the memory: the MLP's products ran at
~11 GB/s on two cores, where a plain sum over 200 MB streams at 13; attention over heads
scaled 1.3x.

Each phase is one or more products (or the attention heads) cut into tasks by their own
plans, claimed exactly as `adaptive` claims them (own range first, then stolen), and each
finished task is counted in the phase's `done` counter with an atomic add. A worker that runs
out of tasks to claim waits until `done` reaches the phase's task count, then starts the next.
It never waits for a worker that has not started: it only reaches the wait once every task of
the phase is claimed, and a task is claimed only by a running worker, which finishes it. So a
team that runs the workers one after another (a threading layer that does) finishes too, on
one thread. The add has release and the wait's load acquire order, so a phase's outputs are
visible to the next.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import adaptive
from .fused import add_into, attend_heads, glu_rows, post_norm, rmsnorm_into, rope_and_store
from .qmatmul import TILE, _group_sums, _span_f32, _span_q4, _span_q8, reads_x_sums


@intrinsic
def _mark_done(typingctx, done, phase):
    """done[phase] += 1 atomically, with release (and acquire) order."""
    if not (isinstance(done, types.Array) and done.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = adaptive.element_pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "acq_rel")

    return types.int64(done, phase), codegen


@intrinsic
def _done_count(typingctx, done, phase):
    """done[phase], loaded atomically with acquire order (never hoisted out of a wait loop)."""
    if not (isinstance(done, types.Array) and done.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = adaptive.element_pointer(context, builder, signature, args)
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(done, phase), codegen


@njit(nogil=True, cache=True)
def _zeros(n):
    """Phase counters. Allocated here, not in the parallel functions: there numba makes
    np.zeros a parallel loop of its own, a fork and join of the threads (5 us each, measured)."""
    return np.zeros(n, np.int64)


@njit(nogil=True, cache=True)
def _wait_done(done, phase, n_tasks):
    while _done_count(done, phase) < n_tasks:
        pass


def _x_sums(weight, x):
    """Per-group sums of x for a weight's tile kernel (the min term), one array per worker."""


def _run_task(weight, x, xs, out, i, s, acc):
    """Task i of out = W x (+ bias): the rows bounds[i]:bounds[i + 1], tile by tile."""


_SPANS = {"q4": _span_q4, "q8": _span_q8, "f32": _span_f32}


def kind_of(codes_type) -> str:
    """A packed weight's layout, told apart by its codes' numba type: "q4" codes are uint8,
    "q8" int8, "f32" a 3-D float32 array."""
    if codes_type.ndim == 3:
        return "f32"
    return "q4" if codes_type.dtype == types.uint8 else "q8"


@overload(_x_sums)
def _x_sums_impl(weight, x):
    sums = kind_of(weight.types[0]) != "f32"

    def impl(weight, x):
        codes, mn, group = weight[0], weight[2], weight[3]
        xs = np.empty(max(1, x.shape[0] // group), np.float32)
        if sums and reads_x_sums(codes, mn):
            _group_sums(x, group, xs)
        return xs

    return impl


@overload(_run_task)
def _run_task_impl(weight, x, xs, out, i, s, acc):
    span = _SPANS[kind_of(weight.types[0])]

    def impl(weight, x, xs, out, i, s, acc):
        codes, scale, mn, bias, bounds = weight[0], weight[1], weight[2], weight[4], weight[6]
        lo, hi = bounds[i], bounds[i + 1]
        span(codes, scale, mn, x, xs, out, lo, hi, s, acc)
        for r in range(lo, hi if bias.shape[0] else lo):
            out[r] += bias[r]

    return impl


@njit(nogil=True, cache=True)
def _product_tasks(weight, x, out, counters, runners, w, done, phase):
    """Worker w claims and runs tasks of out = W x (+ bias) until none is left to claim."""
    ends = weight[8][1:]
    i = adaptive._claim(counters, ends, w)
    if i < 0:
        return
    xs = _x_sums(weight, x)
    s = np.empty((4, TILE), np.float32)  # the tile kernels' scratch: sums, scales, mins, 6-bit high sums
    acc = np.empty(TILE, np.float32)
    while i >= 0:
        _run_task(weight, x, xs, out, i, s, acc)
        runners[i] = w
        _mark_done(done, phase)
        i = adaptive._claim(counters, ends, w)


@njit(nogil=True, cache=True)
def _claims(owners, starts):
    """A plan's per-call claiming state: (counters, runners)."""
    return starts[:-1].copy(), np.empty(owners.shape[0], np.int64)


@njit(nogil=True, cache=True)
def _heads_plan(plan, n_heads, n_workers):
    """The attention plan, or where it is SERIAL_PLAN (too little work to split) one task of
    all heads, so that the phase is the same code either way."""
    bounds, owners, starts = plan
    if owners.shape[0] > 0:
        return bounds, owners, starts
    whole = np.ones(n_workers + 1, np.int64)
    whole[0] = 0
    return np.array([0, n_heads], np.int64), np.zeros(1, np.int64), whole


@njit(nogil=True, cache=True)
def attention_state(wq, wk, wv, wo, heads_plan):
    """The claiming state of one call's attention part: per product and for the heads."""
    return (_claims(wq[7], wq[8]), _claims(wk[7], wk[8]), _claims(wv[7], wv[8]),
            _claims(wo[7], wo[8]), _claims(heads_plan[1], heads_plan[2]))


@njit(nogil=True, cache=True)
def _attention_part(w, h, q, k, v, att, o, wq, wk, wv, wo, qk, cos, sin, interleaved, k_layer,
                    v_layer, slot, n_valid, kv_map, heads_bounds, heads_ends, cq, rq, ck, rk, cv, rv,
                    co, ro, ca, ra, done, once, d):
    """Worker w's share of the attention block, phases d..d+3 of `done`: the Q, K and V
    products; RoPE and the cache write (one task); the heads' attention; the output product.
    Returns once its last task is run, not when the output product is done."""
    _product_tasks(wq, h, q.reshape(-1), cq, rq, w, done, d)
    _product_tasks(wk, h, k, ck, rk, w, done, d)
    _product_tasks(wv, h, v, cv, rv, w, done, d)
    _wait_done(done, d, rq.shape[0] + rk.shape[0] + rv.shape[0])
    if adaptive._fetch_add(once, 0) == 0:  # the first worker here runs the one task
        kv_shape = (k_layer.shape[1], k_layer.shape[2])
        rope_and_store(q, k.reshape(kv_shape), v.reshape(kv_shape), qk, cos, sin, interleaved,
                       k_layer, v_layer, slot)
        _mark_done(done, d + 1)
    _wait_done(done, d + 1, 1)
    i = adaptive._claim(ca, heads_ends, w)
    if i >= 0:
        scores = np.empty(max(1, n_valid), np.float32)
        while i >= 0:
            attend_heads(q, k_layer, v_layer, n_valid, kv_map, att, heads_bounds[i],
                         heads_bounds[i + 1], scores)
            ra[i] = w
            _mark_done(done, d + 2)
            i = adaptive._claim(ca, heads_ends, w)
    _wait_done(done, d + 2, ra.shape[0])
    _product_tasks(wo, att.reshape(-1), o, co, ro, w, done, d + 3)


@njit(nogil=True, cache=True)
def attention_counts(wq, wk, wv, wo, heads_plan, rq, rk, rv, ro, ra):
    """(tasks created, tasks run by their owner) of one call's attention part."""
    created = rq.shape[0] + rk.shape[0] + rv.shape[0] + ro.shape[0] + ra.shape[0]
    local = (adaptive._count_local(rq, wq[7]) + adaptive._count_local(rk, wk[7])
             + adaptive._count_local(rv, wv[7]) + adaptive._count_local(ro, wo[7])
             + adaptive._count_local(ra, heads_plan[1]))
    return created, local


@njit(nogil=True, cache=True)
def mlp_state(w_gate, w_down):
    """The claiming state of one call's MLP part (gate and up have one shape, so one plan)."""
    return _claims(w_gate[7], w_gate[8]), _claims(w_down[7], w_down[8])


@njit(nogil=True, cache=True)
def _mlp_part(w, h, gate, up, o, w_gate, w_up, w_down, gelu, cg, rg, cd, rd, done, d):
    """Worker w's share of the MLP block, phases d, d+1 of `done`: the gate and up products
    (a task computes both for its rows, then their SwiGLU or GeGLU); the down product."""
    bounds, ends = w_gate[6], w_gate[8][1:]
    i = adaptive._claim(cg, ends, w)
    if i >= 0:
        xs_gate, xs_up = _x_sums(w_gate, h), _x_sums(w_up, h)
        s = np.empty((4, TILE), np.float32)
        acc = np.empty(TILE, np.float32)
        while i >= 0:
            _run_task(w_gate, h, xs_gate, gate, i, s, acc)
            _run_task(w_up, h, xs_up, up, i, s, acc)
            glu_rows(gate, up, gate, bounds[i], bounds[i + 1], gelu)
            rg[i] = w
            _mark_done(done, d)
            i = adaptive._claim(cg, ends, w)
    _wait_done(done, d, rg.shape[0])
    _product_tasks(w_down, gate, o, cd, rd, w, done, d + 1)


@njit(nogil=True, cache=True)
def mlp_counts(w_gate, w_down, rg, rd):
    return (rg.shape[0] + rd.shape[0],
            adaptive._count_local(rg, w_gate[7]) + adaptive._count_local(rd, w_down[7]))


@njit(nogil=True, cache=True, parallel=True)
def layer_phases(x, h, q, k, v, att, o, gate, up, ffn_norm, eps, wq, wk, wv, wo, w_gate, w_up,
                 w_down, qk, post, cos, sin, interleaved, k_layer, v_layer, slot, n_valid, kv_map,
                 attention_plan):
    """A whole decoder layer for one token from the attention block's normed input h: the
    attention part, then (one task) x += its output and the MLP's norm, then the MLP part;
    the caller adds the MLP's output o to x. Returns (tasks created, tasks local)."""
    n_workers = wq[8].shape[0] - 1
    heads = _heads_plan(attention_plan, q.shape[0], n_workers)
    # Arrays go to the workers one by one: numba's parfors refuses a tuple of arrays of one
    # type in a prange body ("scalar type UniTuple(array(int64, 1d, C) x 2) given for non
    # scalar argument"); the weights' tuples, of mixed types, pass.
    (cq, rq), (ck, rk), (cv, rv), (co, ro), (ca, ra) = attention_state(wq, wk, wv, wo, heads)
    (cg, rg), (cd, rd) = mlp_state(w_gate, w_down)
    done, once = _zeros(7), _zeros(2)
    heads_bounds, heads_ends = heads[0], heads[2][1:]
    for w in prange(n_workers):
        _attention_part(w, h, q, k, v, att, o, wq, wk, wv, wo, qk, cos, sin, interleaved, k_layer,
                        v_layer, slot, n_valid, kv_map, heads_bounds, heads_ends, cq, rq, ck, rk,
                        cv, rv, co, ro, ca, ra, done, once, 0)
        _wait_done(done, 3, ro.shape[0])
        if adaptive._fetch_add(once, 1) == 0:
            post_norm(o, post[0], eps)
            add_into(x, o)
            rmsnorm_into(x, ffn_norm, eps, h)
            _mark_done(done, 4)
        _wait_done(done, 4, 1)
        _mlp_part(w, h, gate, up, o, w_gate, w_up, w_down, post[2], cg, rg, cd, rd, done, 5)
    c1, l1 = attention_counts(wq, wk, wv, wo, heads, rq, rk, rv, ro, ra)
    c2, l2 = mlp_counts(w_gate, w_down, rg, rd)
    return c1 + c2, l1 + l2
