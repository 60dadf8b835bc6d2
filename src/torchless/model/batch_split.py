"""A micro-batch cut into parts by sequence, each part run whole by its own thread.

Why: run as one micro-batch over T threads, every product of every layer is cut into row tasks
once its work passes the inline threshold (kernels/adaptive), so a decode step is ~240
parallel regions, each ending in a barrier. Where a model's products are too small for that,
they run on the calling thread and the other cores sit idle; cut into T parts instead, each
thread runs the whole model on its part with no barrier until the step ends. Where the
products are big enough to be cut, the whole is faster: each thread expands its own tiles of
a weight to float32 once for every row of the micro-batch, where each part would expand every
tile for its fewer rows (see BatchSplit.forward for the measurement). So parts are taken only
for micro-batches whose products would run on one thread.

A row's result does not depend on the other rows of its micro-batch, so a decode step's logits
are the same bits either way (a prompt chunk in a smaller micro-batch may take the batched
kernels rather than BLAS: the same up to rounding); parts keep MIN_ROWS_PER_PART rows, on the
same side of the batched kernels' switches of arithmetic as the whole.

The parts are the work distribution's tasks at this level, one per thread, all local, and
`WorkStealingStats` counts them. They are balanced by tokens; a micro-batch whose parts would
be too unequal (one long prompt chunk) or long enough for BLAS runs whole. A part's thread runs
numba with T // parts threads, so a batch too small to give each thread a part still uses every
core. Each thread reads every weight once per step, so the weight traffic grows with the parts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..kernels.adaptive import GLOBAL_STATS, _get_num_threads, inline_threshold_bytes
from ..kernels.direct_tiles import DIRECT_MAX_ROWS
from ..kernels.gemm import MIN_TOKENS_FOR_BLAS

# The batched products switch arithmetic at DIRECT_MAX_ROWS rows of X (from the direct kernels
# to expanded float tiles), so a part keeps at least that many tokens, as the whole then has:
# the parts' rows get the same bits as the whole's.
MIN_ROWS_PER_PART = DIRECT_MAX_ROWS
# A micro-batch runs whole over T threads at about WHOLE_SPEEDUP / T of one thread's time per
# token (measured ~1.3-1.5 on 2 cores with products cut into tasks, before the float batched
# kernels), so parts pay only while the largest holds less than WHOLE_SPEEDUP / T of the
# tokens: a long prompt chunk beside a few decode rows runs whole.
WHOLE_SPEEDUP = 1.4
# A part of MIN_TOKENS_FOR_BLAS tokens or more would expand every weight to float32 for BLAS,
# each part again, where the whole micro-batch expands each row once over all threads: on 2
# cores, SmolLM2, 16 prompts of 11 tokens ran 8% faster whole, 4 of 32 12% (8 of 11, whose
# parts stay on the batched kernels, 25% faster in parts).


def assign_parts(spans, n_threads: int, products_split: bool = False) -> list[list[int]]:
    """The spans' indices, cut into parts balanced by tokens (longest first, each to the part
    with the fewest so far), or one part when the micro-batch should run whole: one thread, its
    products big enough to be cut into tasks over the threads (`products_split`: see
    BatchSplit.forward), a sequence with two spans in it (its later tokens read its earlier
    ones' keys), parts too unequal to pay, or parts big enough for BLAS."""
    tokens = [len(sp.tokens) for sp in spans]
    total = sum(tokens)
    n = min(n_threads, len(spans), total // MIN_ROWS_PER_PART)
    if n < 2 or products_split or len({id(sp.state) for sp in spans}) < len(spans):
        return [list(range(len(spans)))]
    parts, loads = [[] for _ in range(n)], [0] * n
    for i in sorted(range(len(spans)), key=lambda i: -tokens[i]):
        k = loads.index(min(loads))
        parts[k].append(i)
        loads[k] += tokens[i]
    if (max(loads) * n > WHOLE_SPEEDUP * total or max(loads) >= MIN_TOKENS_FOR_BLAS
            or min(loads) < MIN_ROWS_PER_PART):
        return [list(range(len(spans)))]
    return [sorted(part) for part in parts]


class BatchSplit:
    """Runs `forward(spans)` of a model as parts on a pool of threads; see the module docstring."""

    def __init__(self):
        self._pool, self._pool_threads = None, 0
        self._largest = (None, 0)  # (model, bytes of its largest product in a layer)

    def forward(self, model, spans) -> np.ndarray:
        n_threads = _get_num_threads()
        # Whole, a micro-batch's products are cut into row tasks once their work passes the
        # inline threshold (kernels/adaptive), and then each thread expands its own tiles once
        # for every row, where each part expands every tile for its own rows: on 2 cores,
        # SmolLM2, 64 greedy tokens, whole against 2 parts alternating in one process (a scratch
        # A/B of `LLM.create_completion`, 4 rounds, medians): 8 sequences 254 against 231
        # tok/s, 16 339 against 317. Parts are for
        # micro-batches whose products would run on one thread whole.
        tokens = sum(len(sp.tokens) for sp in spans)
        parts = assign_parts(spans, n_threads, self._largest_product(model) * tokens >= inline_threshold_bytes())
        if len(parts) == 1:
            return model.forward_spans(spans)
        threads_each = n_threads // len(parts)
        model.rope_at(max(sp.start + len(sp.tokens) for sp in spans))  # grown here, not in the threads
        pool = self._pool_of(len(parts) - 1, threads_each)
        futures = [pool.submit(model.forward_spans, [spans[i] for i in part]) for part in parts[1:]]
        numba.set_num_threads(threads_each)  # per thread in numba: this thread runs part 0
        try:
            first = model.forward_spans([spans[i] for i in parts[0]])
        finally:
            numba.set_num_threads(n_threads)
            rest = [f.exception() or f.result() for f in futures]  # every part ends before we go on
        for r in rest:
            if isinstance(r, BaseException):
                raise r
        GLOBAL_STATS.record_counts(len(parts), len(parts))
        logits = np.empty((len(spans), first.shape[1]), first.dtype)
        for part, rows in zip(parts, [first, *rest]):
            logits[part] = rows
        return logits

    def _largest_product(self, model) -> int:
        if self._largest[0] is not model:
            layer = model.layers[0].linears() if model.layers else []
            self._largest = (model, max((linear.weight.data.nbytes for linear in layer), default=0))
        return self._largest[1]

    def _pool_of(self, workers: int, threads_each: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_threads != (workers, threads_each):
            self.close()
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="torchless-part",
                                            initializer=numba.set_num_threads, initargs=(threads_each,))
            self._pool_threads = (workers, threads_each)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
