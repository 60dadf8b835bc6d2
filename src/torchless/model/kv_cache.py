"""The KV cache of one sequence, as an object (mlx-lm's models/cache.py).

It owns the key and value arrays of every layer, the ring of a sliding-window model (position p
lives in slot p % cache_len), the windows of a model whose layers slide only in part, and the
position up to which the sequence has been run. Every path
of the model writes and reads through it: `write` for new keys and values, `window` for what a
run of new tokens may attend to, `layer` for the compiled one-token kernels, `advance` to move
the position on.
"""

from __future__ import annotations

import mmap

import numpy as np

from ..errors import ContextOverflowError


def lazy_zeros(shape) -> np.ndarray:
    """float32 zeros in an anonymous mapping, resident page by page as written. (np.zeros asks
    the kernel for 2 MB huge pages on large arrays, so the first position cached in each layer
    would cost 2 MB per layer, K and V, per sequence: 120 MB on SmolLM2 before any real use.)"""
    nbytes = max(4, 4 * int(np.prod(shape)))
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32, count=nbytes // 4).reshape(shape)


class KVCache:
    """Keys and values of one sequence: (n_layers, cache_len, n_kv_heads, head_dim) each.

    cache_len is the whole context of the sequence (`max_seq_len`), or the sliding window where
    that is shorter; `pos` is the next position to run. The arrays start small and double as
    positions are written, so a model whose context is huge costs only what a sequence uses.

    layer_windows: where only some layers slide (Gemma 3: 5 of every 6), each layer's window
    (None: the whole context). Every layer then keeps the whole context, and a windowed layer
    attends to its last `window` positions: simple, and at a context of N tokens it costs
    N / window times the memory of a ring for those layers (Gemma 3 270M, float32, at 8K tokens:
    288 MiB a sequence where rings would take 63 MiB), but only what a sequence has used.
    """

    INITIAL_SLOTS = 256

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 sliding_window: int | None = None, layer_windows: tuple | None = None):
        self.max_seq_len = int(max_seq_len)
        self.cache_len = min(self.max_seq_len, sliding_window or self.max_seq_len)
        self.layer_windows = tuple(layer_windows) if layer_windows is not None else (None,) * n_layers
        self._shape = (n_layers, n_kv_heads, head_dim)
        self.k = self.v = np.zeros((n_layers, 0, n_kv_heads, head_dim), np.float32)
        self.pos = 0

    def reserve(self, n_positions: int) -> None:
        """Make room now for positions 0..n_positions-1. Growing replaces the arrays, so where
        several threads write one sequence's cache (pipeline stages), it must happen before."""
        self._reserve(min(n_positions, self.cache_len))

    def _reserve(self, n_slots: int) -> None:
        """Make room for slots 0..n_slots-1 (keeping what is written)."""
        if n_slots <= self.k.shape[1]:
            return
        capacity = min(self.cache_len, max(n_slots, 2 * self.k.shape[1], self.INITIAL_SLOTS))
        n_layers, n_kv_heads, head_dim = self._shape
        for name in ("k", "v"):
            grown = lazy_zeros((n_layers, capacity, n_kv_heads, head_dim))
            old = getattr(self, name)
            grown[:, :old.shape[1]] = old
            setattr(self, name, grown)

    @staticmethod
    def bytes_for(config, n_kv_heads: int, max_seq_len: int) -> int:
        """What a cache of this size costs once full: the scheduler's unit of memory."""
        cache_len = min(max_seq_len, config.kv_window or max_seq_len)
        return 2 * 4 * config.n_layers * cache_len * n_kv_heads * config.head_dim

    def check_fits(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ContextOverflowError(f"sequence of {end} tokens does not fit the context of "
                                       f"{self.max_seq_len}")

    def slots(self, positions: np.ndarray) -> np.ndarray:
        return positions % self.cache_len

    def write(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store the keys and values of `positions` (consecutive, ascending); of a run longer
        than the ring only the newest cache_len entries survive, as they would one by one."""
        keep = slice(max(0, len(positions) - self.cache_len), len(positions))
        self._reserve(min(int(positions[-1]) + 1, self.cache_len))
        slots = self.slots(positions[keep])
        self.k[layer, slots] = k[keep]
        self.v[layer, slots] = v[keep]

    def window(self, layer: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys, values and positions (oldest first) held for the positions before `start`:
        what a run of tokens from `start` attends to besides itself. Read before `write`."""
        past = np.arange(max(0, start - min(self.cache_len, self.layer_windows[layer] or self.cache_len)), start)
        slots = self.slots(past)
        return self.k[layer, slots], self.v[layer, slots], past

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The ring of one layer, (slots, n_kv_heads, head_dim) views, for compiled kernels;
        slot p % cache_len holds position p."""
        return self.k[layer], self.v[layer]

    def attended(self, layer: int, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(k, v, n_valid): views whose first n_valid slots hold what the token at `pos` attends
        to once written: the layer's ring, or a windowed layer's last `window` positions."""
        window = self.layer_windows[layer]
        if window is None or window >= self.cache_len:
            return self.k[layer], self.v[layer], self.n_valid(pos)
        low = max(0, pos + 1 - window)  # a full cache: slot p holds position p
        return self.k[layer, low:], self.v[layer, low:], pos + 1 - low

    def n_valid(self, pos: int) -> int:
        """Slots holding keys once position `pos` is written."""
        return min(pos + 1, self.cache_len)

    def advance(self, end: int) -> None:
        """The sequence has been run up to (not including) `end`. Pipeline stages may finish
        later tokens of a sequence before earlier ones leave the last stage: never go back."""
        self.pos = max(self.pos, end)

    def reset(self) -> None:
        self.pos = 0
