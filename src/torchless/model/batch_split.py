"""A decode micro-batch cut into parts by sequence, each part run whole by its own thread.

Why: run as one micro-batch over T threads, every product of every layer is cut into row tasks,
so a step is ~240 parallel regions, each ending in a barrier where one thread waits for the
other, plus the serial pieces between them (norms, RoPE, attention at short context). With the
sequences cut into T parts instead, each thread runs the whole model on its part with no
barrier until the step ends: on 2 cores, SmolLM2, 8 sequences, this is ~1.3x the tok/s of the
row-task split (benchmarks/compare.py --batch). The products keep their cost per row, since the
batched integer kernels read each weight tile once per 4 rows of X, and a row's result does not
depend on the other rows of its micro-batch, so the logits are the same either way.

The parts are the work distribution's tasks at this level (one per thread, so all local), and
`WorkStealingStats` counts them. Each part's thread runs numba with T // parts threads, so a
batch too small to give every thread its part still uses every core.

Each thread reads every weight once per step, so the weight traffic grows with the parts; a
part keeps at least MIN_ROWS_PER_PART sequences, which bounds it for a large model on many
cores (a part of 1 row reads its weights for one token, 2 rows for two).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..kernels.adaptive import GLOBAL_STATS, _get_num_threads

MIN_ROWS_PER_PART = 2


def n_parts(spans, n_threads: int) -> int:
    """How many parts a micro-batch runs as: one per thread for a decode step (one token of
    each of several sequences) big enough, else 1 (prefill chunks keep the row-task split: a
    chunk's tokens depend on each other, and its products are big enough to split well)."""
    if n_threads < 2 or any(len(sp.tokens) != 1 for sp in spans):
        return 1
    if len({id(sp.state) for sp in spans}) < len(spans):
        return 1
    return max(1, min(n_threads, len(spans) // MIN_ROWS_PER_PART))


class BatchSplit:
    """Runs `forward(spans)` of a model as parts on a pool of threads; see the module docstring."""

    def __init__(self):
        self._pool, self._pool_threads = None, 0

    def forward(self, model, spans) -> np.ndarray:
        n_threads = _get_num_threads()
        parts = n_parts(spans, n_threads)
        if parts == 1:
            return model.forward_spans(spans)
        bounds = [i * len(spans) // parts for i in range(parts + 1)]
        threads_each = n_threads // parts
        model.rope_at(max(sp.start for sp in spans))  # the table grows here, not in the threads
        pool = self._pool_of(parts - 1, threads_each)
        futures = [pool.submit(model.forward_spans, spans[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
        numba.set_num_threads(threads_each)  # per thread in numba: this thread runs part 0
        try:
            first = model.forward_spans(spans[:bounds[1]])
        finally:
            numba.set_num_threads(n_threads)
            rest = [f.exception() or f.result() for f in futures]  # every part ends before we go on
        for r in rest:
            if isinstance(r, BaseException):
                raise r
        GLOBAL_STATS.record_counts(parts, parts)
        return np.concatenate([first, *rest])

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
