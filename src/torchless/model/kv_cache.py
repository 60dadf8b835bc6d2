"""The KV cache of one sequence, as an object (mlx-lm's models/cache.py).

It owns the key and value arrays of every layer, the ring of a sliding-window model (position p
lives in slot p % cache_len) or of the windowed layers of a model whose layers slide only in
part, and the position up to which the sequence has been run. Every path
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
    (None: the whole context). `k` and `v` then hold the other layers, whole, and the windowed
    ones have rings of their own, `k_local` and `v_local` (n_local, window, n_kv_heads,
    head_dim): Gemma 3 270M at 32K tokens keeps 207 MiB a sequence, not 1.1 GiB.
    """

    INITIAL_SLOTS = 256

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 sliding_window: int | None = None, layer_windows: tuple | None = None):
        self.max_seq_len = int(max_seq_len)
        self.cache_len = min(self.max_seq_len, sliding_window or self.max_seq_len)
        windows = tuple(layer_windows) if layer_windows is not None else (None,) * n_layers
        rings = {w for w in windows if w is not None and w < self.cache_len}
        if len(rings) > 1:
            raise ValueError(f"one sliding window for all local layers, got {sorted(rings)}")
        self.local_len = rings.pop() if rings else 0  # the ring of windowed layers
        local = [i for i, w in enumerate(windows) if w is not None and w < self.cache_len]
        whole = [i for i in range(n_layers) if i not in local]
        # layer -> (local?, its index in k / v or in k_local / v_local)
        self._where = {**{li: (False, j) for j, li in enumerate(whole)},
                       **{li: (True, j) for j, li in enumerate(local)}}
        self._shape = (n_kv_heads, head_dim)
        self.k = self.v = np.zeros((len(whole), 0, n_kv_heads, head_dim), np.float32)
        self.k_local = self.v_local = np.zeros((len(local), 0, n_kv_heads, head_dim), np.float32)
        self.pos = 0

    def reserve(self, n_positions: int) -> None:
        """Make room now for positions 0..n_positions-1. Growing replaces the arrays, so where
        several threads write one sequence's cache (pipeline stages), it must happen before."""
        self._reserve(n_positions)

    def _reserve(self, n_positions: int) -> None:
        """Make room for positions 0..n_positions-1 in every layer (keeping what is written)."""
        self._grow(("k", "v"), min(n_positions, self.cache_len), self.cache_len)
        if self.local_len:
            self._grow(("k_local", "v_local"), min(n_positions, self.local_len), self.local_len)

    def _grow(self, names: tuple, n_slots: int, length: int) -> None:
        old_k = getattr(self, names[0])
        if n_slots <= old_k.shape[1]:
            return
        capacity = min(length, max(n_slots, 2 * old_k.shape[1], self.INITIAL_SLOTS))
        for name in names:
            old = getattr(self, name)
            grown = lazy_zeros((old.shape[0], capacity) + self._shape)
            grown[:, :old.shape[1]] = old
            setattr(self, name, grown)

    @staticmethod
    def bytes_for(config, n_kv_heads: int, max_seq_len: int) -> int:
        """What a cache of this size costs once full: the scheduler's unit of memory."""
        per_position = 2 * 4 * n_kv_heads * config.head_dim
        cache_len = min(max_seq_len, config.kv_window or max_seq_len)
        lengths = [min(cache_len, config.layer_window(i) or cache_len) for i in range(config.n_layers)]
        return per_position * sum(lengths)

    def check_fits(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ContextOverflowError(f"sequence of {end} tokens does not fit the context of "
                                       f"{self.max_seq_len}")

    def slots(self, positions: np.ndarray) -> np.ndarray:
        """The slots of `positions` in a layer of `k` / `v` (whole or a ring of cache_len)."""
        return positions % self.cache_len

    def _layer_arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The layer's keys and values (slots, n_kv_heads, head_dim), and their ring length."""
        local, j = self._where[layer]
        if local:
            return self.k_local[j], self.v_local[j], self.local_len
        return self.k[j], self.v[j], self.cache_len

    def write(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store the keys and values of `positions` (consecutive, ascending); of a run longer
        than the ring only the newest entries survive, as they would one by one."""
        self._reserve(int(positions[-1]) + 1)
        k_layer, v_layer, length = self._layer_arrays(layer)
        keep = slice(max(0, len(positions) - length), len(positions))
        slots = positions[keep] % length
        k_layer[slots] = k[keep]
        v_layer[slots] = v[keep]

    def window(self, layer: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys, values and positions (oldest first) held for the positions before `start`:
        what a run of tokens from `start` attends to besides itself. Read before `write`."""
        k_layer, v_layer, length = self._layer_arrays(layer)
        past = np.arange(max(0, start - length), start)
        slots = past % length
        return k_layer[slots], v_layer[slots], past

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The ring of one layer, (slots, n_kv_heads, head_dim) views, for compiled kernels;
        slot p % cache_len holds position p (p % local_len in a windowed layer's own ring)."""
        k_layer, v_layer, _ = self._layer_arrays(layer)
        return k_layer, v_layer

    def rings_of(self, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(keys, values, index): the arrays of every layer of `layer`'s kind (whole cache or
        windowed rings), (n, slots, n_kv_heads, head_dim), and the layer's index in them; for
        compiled kernels that take several sequences' caches."""
        local, j = self._where[layer]
        return (self.k_local, self.v_local, j) if local else (self.k, self.v, j)

    def ring_length(self, layer: int) -> int:
        """Positions the layer holds before the oldest is overwritten."""
        return self._layer_arrays(layer)[2]

    def attended(self, layer: int, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(k, v, n_valid): the layer's ring, whose first n_valid slots hold what the token at
        `pos` attends to once written."""
        k_layer, v_layer, length = self._layer_arrays(layer)
        return k_layer, v_layer, min(pos + 1, length)

    def n_valid(self, pos: int) -> int:
        """Slots holding keys once position `pos` is written (in a layer of `k` / `v`)."""
        return min(pos + 1, self.cache_len)

    def advance(self, end: int) -> None:
        """The sequence has been run up to (not including) `end`. Pipeline stages may finish
        later tokens of a sequence before earlier ones leave the last stage: never go back."""
        self.pos = max(self.pos, end)

    def reset(self) -> None:
        self.pos = 0

    # -- prefixes (engine/prefix_cache.py) ------------------------------------------------------

    def ring_room(self) -> int:
        """Positions from 0 that fit every ring of this cache without wrapping."""
        return min(self.cache_len, self.local_len or self.cache_len)

    def intact_prefix(self) -> int:
        """Positions from 0 still held: all that were run, unless a ring has wrapped over them."""
        return self.pos if self.pos <= self.ring_room() else 0

    def copy_prefix(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of positions 0..n-1 (n <= intact_prefix()), keys and values, each
        (n_layers, n, n_kv_heads, head_dim) whatever rings hold them: a cache of another
        length may keep its layers otherwise."""
        layers = [self._layer_arrays(layer) for layer in range(len(self._where))]
        return (np.stack([k[:n] for k, _, _ in layers]), np.stack([v[:n] for _, v, _ in layers]))

    def load_prefix(self, arrays: tuple[np.ndarray, np.ndarray], n: int) -> None:
        """Start a new sequence's cache with positions 0..n-1 of copy_prefix's arrays."""
        if self.pos != 0 or n > self.ring_room():
            raise ValueError(f"a prefix of {n} positions does not fit a cache at position "
                             f"{self.pos} with {self.ring_room()} positions of room")
        self._reserve(n)
        keys, values = arrays
        for layer in range(len(self._where)):
            k, v, _ = self._layer_arrays(layer)
            k[:n], v[:n] = keys[layer, :n], values[layer, :n]
        self.pos = n
