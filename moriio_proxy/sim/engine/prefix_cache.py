"""One DP rank's prefix cache, as vLLM's KV cache manager keeps it: full blocks of prompt
tokens keyed by a hash chained over every block before them, least recently used evicted
first.

Why the sim has one: a router that sends a conversation's next turn where its history was
computed saves that prefill, and the saving only shows against an engine that keeps what
it computed, for a while, in bounded memory. What is modelled, after vLLM 0.32's
``KVCacheManager`` and ``BlockPool``:

* Only full blocks of ``block_size`` tokens are cached; a block's key chains the previous
  block's key, so a hit on block k is a hit on the whole prefix before it.
* A lookup matches the longest run of cached leading blocks, at most ``(n - 1) //
  block_size`` of them: the last prompt token is always computed (``max_cache_hit_length
  = num_tokens - 1``), as the first output token needs its logits.
* Capacity is a number of blocks (``num_gpu_blocks``); inserting beyond it evicts the
  least recently used. A request's blocks are touched last to first, as vLLM frees them in
  reverse order, so a prompt's tail is evicted before its head and a key never outlives
  the one before it.

Simplified: blocks that requests are using (or that P holds for a transfer) are evictable
here, where vLLM pins them; with a capacity well above what is in flight that changes
nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    """Chained block keys in LRU order (oldest first), bounded by ``capacity`` blocks."""

    def __init__(self, block_size: int, capacity: int) -> None:
        if block_size < 1 or capacity < 1:
            raise ValueError("block_size and capacity must be at least 1")
        self.block_size = block_size
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        """Blocks cached: the quantity ``capacity`` bounds."""
        return len(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def keys(self, tokens: Sequence[str]) -> list[int]:
        """The chained keys of the prompt's full blocks (a trailing partial block has none).

        A key hashes the previous key with the block's tokens: one tuple hash per block.
        Python's hash is salted per process, which suits a cache that lives in one.
        """
        size = self.block_size
        key = 0
        out: list[int] = []
        for start in range(0, len(tokens) - size + 1, size):
            key = hash((key, *tokens[start : start + size]))
            out.append(key)
        return out

    def match(self, keys: Sequence[int], n_tokens: int) -> int:
        """Cached prompt tokens: the leading cached blocks, capped so one token is computed."""
        limit = min(len(keys), max(n_tokens - 1, 0) // self.block_size)
        blocks = self._blocks
        hit = 0
        while hit < limit and keys[hit] in blocks:
            hit += 1
        return hit * self.block_size

    def insert(self, keys: Sequence[int]) -> int:
        """Cache (or refresh) a prompt's blocks as the most recently used; returns how
        many blocks were evicted to stay within capacity."""
        blocks = self._blocks
        touch = blocks.move_to_end
        for key in reversed(keys):
            if key in blocks:
                touch(key)
            else:
                blocks[key] = None
        evicted = max(len(blocks) - self.capacity, 0)
        for _ in range(evicted):
            blocks.popitem(last=False)
        return evicted

    def clear(self) -> None:
        self._blocks.clear()
