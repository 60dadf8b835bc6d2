"""A memory-bandwidth probe: the roofline that decode speed is measured against."""

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)
def parallel_sum(buf: np.ndarray, n_chunks: int) -> float:
    # Per-thread partial sums over contiguous slices, so each thread streams its own memory.
    step = (buf.size + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, np.float32)
    for c in numba.prange(n_chunks):
        partial[c] = buf[c * step:min((c + 1) * step, buf.size)].sum()
    return partial.sum()
