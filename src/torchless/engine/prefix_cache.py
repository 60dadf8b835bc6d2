"""Keys and values of prompt prefixes seen before (vLLM's automatic prefix caching, llama.cpp
server's cache_prompt), so a prompt that starts as an earlier one did is run only from where it
differs: a chat's system prompt, the earlier turns of a conversation, a shared few-shot preamble.

Prompts are cut into blocks of BLOCK tokens. A block's key is a hash of the block's tokens and
of the key of the block before it, so a key stands for the whole prefix up to the block's end,
and two prompts share exactly the keys of the blocks they share. When a sequence's prompt has
been run, and again when the sequence ends (its prompt and completion as run: a chat's next turn
starts with them), its keys and values up to its last whole block (a snapshot: copies, since
the sequence's own cache goes on changing and is released when it ends) are kept under every
one of its block keys. A new prompt walks its own keys to the deepest one kept, and its cache starts as
that many positions of the snapshot. At least one prompt token is always run: its logits give
the first completion token.

The snapshots' bytes stay within a budget; the least recently used go first. A prefix is kept
only while every position of it is still in the cache's rings (a sliding window may have
overwritten the start of a long prompt), and reused only where it fits the new cache's rings.

The reused keys and values are the bits the earlier run computed; a run without the cache
computes them in chunks of another size, which may take other kernels (BLAS or the integer
ones), so the logits that follow agree to rounding, not bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict

# Reuse comes in whole blocks: a smaller block wastes fewer of a shared prefix's last tokens
# (SmolLM2's chat template shares 23 tokens before the user's message), a larger one hashes less.
BLOCK = 4


def block_keys(tokens: list[int]) -> list[int]:
    """The key of each whole block of `tokens`: key i stands for tokens[:BLOCK * (i + 1)]."""
    keys, key = [], 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        key = hash((key, tuple(tokens[end - BLOCK:end])))
        keys.append(key)
    return keys


class Snapshot:
    """The first `n` positions of a sequence's caches (one per in-process shard): per cache the
    arrays of KVCache.copy_prefix."""

    def __init__(self, tokens: list[int], keys: list[int], caches: list) -> None:
        self.tokens, self.keys = tuple(tokens), keys
        self.n = len(tokens)
        self.arrays = [cache.copy_prefix(self.n) for cache in caches]
        self.nbytes = sum(a.nbytes for arrays in self.arrays for a in arrays)


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._snapshots: OrderedDict[int, Snapshot] = OrderedDict()  # by id(), oldest use first
        self._by_key: dict[int, Snapshot] = {}
        self.nbytes = 0
        self.hits = 0           # prompts that started from a snapshot
        self.queried_tokens = 0  # prompt tokens looked up
        self.reused_tokens = 0  # prompt tokens found, which were not run again

    def set_budget(self, budget_bytes: int) -> None:
        """A new budget; the least recently used snapshots go until the kept ones fit it."""
        self.budget_bytes = int(budget_bytes)
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._snapshots.values())))

    def lookup(self, prompt: list[int], room: int) -> tuple[Snapshot, int] | None:
        """The snapshot holding the longest kept prefix of `prompt` that leaves a token to run
        and fits `room` positions, and that prefix's length; None if none is kept."""
        self.queried_tokens += len(prompt)
        snapshot, n = None, 0
        for key in block_keys(prompt[:min(len(prompt) - 1, room)]):
            if key not in self._by_key:
                break
            snapshot, n = self._by_key[key], n + BLOCK
        if snapshot is None or snapshot.tokens[:n] != tuple(prompt[:n]):  # none, or a hash collision
            return None
        self._snapshots.move_to_end(id(snapshot))
        return snapshot, n

    def store(self, prompt: list[int], caches: list, room: int) -> None:
        """Keep the prompt's whole blocks from `caches`, unless a kept snapshot holds them all,
        they do not fit `room` (the positions every ring still holds) or the budget."""
        keys = block_keys(prompt[:room])
        if not keys or not caches:
            return
        kept = self._by_key.get(keys[-1])
        n = BLOCK * len(keys)
        if kept is not None and kept.tokens[:n] == tuple(prompt[:n]):
            self._snapshots.move_to_end(id(kept))
            return
        snapshot = Snapshot(prompt[:n], keys, caches)
        if snapshot.nbytes > self.budget_bytes:
            return
        while self.nbytes + snapshot.nbytes > self.budget_bytes:
            self._drop(next(iter(self._snapshots.values())))
        self._snapshots[id(snapshot)] = snapshot
        self.nbytes += snapshot.nbytes
        shadowed = {id(s): s for s in map(self._by_key.get, keys) if s is not None}
        for key in keys:
            self._by_key[key] = snapshot
        for older in shadowed.values():  # its keys now all lead to the new one: it is dead weight
            if not any(self._by_key.get(key) is older for key in older.keys):
                self._drop(older)

    def _drop(self, snapshot: Snapshot) -> None:
        del self._snapshots[id(snapshot)]
        self.nbytes -= snapshot.nbytes
        for key in snapshot.keys:
            if self._by_key.get(key) is snapshot:
                del self._by_key[key]

    def restore(self, snapshot: Snapshot, n: int, caches: list) -> None:
        """Start `caches` (a new sequence's, one per shard) with the snapshot's first n positions."""
        for cache, arrays in zip(caches, snapshot.arrays, strict=True):
            cache.load_prefix(arrays, n)
        self.hits += 1
        self.reused_tokens += n

