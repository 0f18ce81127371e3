"""An approximate index of which targets recently computed which prompt prefixes.

vLLM caches KV in fixed-size blocks keyed by a hash chained over the block's tokens and
every block before it, so a block hit implies a hit on the whole prefix before it. This
index mirrors that on text: the prompt is cut into fixed-size blocks of characters, each
block keyed by a hash chained from the previous key, and each key maps to the set of
targets (a bitmask) that were sent a prompt with that prefix. Matching a request is one
dict lookup per block, whatever the number of prompts remembered; recording is one dict
update per block.

Memory is bounded by a number of blocks, evicted least recently used first. A prompt's
blocks are touched last to first, so its first block is the most recently used: within
a prefix the tail goes before the head, as in vLLM, and a key never outlives the key
before it. That makes holders monotone along a prompt (a target holding block k holds
every block before k), which is why a match can stop at the first miss.

It is approximate on purpose: it does not know what an engine really evicted, only what
was sent where; one LRU over all targets stands in for each engine's own.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Collection, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class PrefixIndex(Generic[K]):
    """Block hash -> bitmask of the targets holding that prefix, in LRU order.

    Targets are any hashable keys; each gets one bit while it is known. ``drop`` clears a
    target's bits everywhere and frees the bit for reuse, so a dead target neither holds
    memory nor passes its history to the next target given its bit.
    """

    def __init__(self, block_chars: int, max_blocks: int) -> None:
        if block_chars < 1 or max_blocks < 1:
            raise ValueError("block_chars and max_blocks must be at least 1")
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self._bits: dict[K, int] = {}  # target -> its bit's position
        self._owners: dict[int, K] = {}  # bit position -> target
        self._free: list[int] = []  # released positions, lowest reused first
        self._next = 0

    def __len__(self) -> int:
        """Blocks held: the quantity ``max_blocks`` bounds."""
        return len(self._blocks)

    def hashes(self, text: str | bytes) -> list[int]:
        """Chained keys of the text's full blocks (a trailing partial block is not one).

        One slice and one hash per block, both C work: no loop over characters. Python's
        hash is salted per process, which is fine for an index that lives in one process.
        """
        size = self.block_chars
        key = 1 if isinstance(text, bytes) else 0  # token bytes never match equal text
        out: list[int] = []
        append = out.append
        for start in range(0, len(text) - size + 1, size):
            key = hash((key, text[start : start + size]))
            append(key)
        return out

    def match(self, hashes: list[int], allowed: int) -> tuple[int, int]:
        """The longest indexed prefix among ``allowed`` targets: (blocks, holders mask)."""
        get = self._blocks.get
        depth = holders = 0
        for key in hashes:
            held = get(key, 0) & allowed
            if not held:
                break
            holders = held
            depth += 1
        return depth, holders

    def record(self, hashes: list[int], target: K) -> None:
        """Remember that ``target`` was sent this prompt, and make it the most recent."""
        bit = self.bit(target)
        blocks = self._blocks
        get = blocks.get
        touch = blocks.move_to_end
        for key in reversed(hashes):
            held = get(key)
            if held is None:
                blocks[key] = bit
                continue
            if not held & bit:
                blocks[key] = held | bit
            touch(key)
        for _ in range(len(blocks) - self.max_blocks):
            blocks.popitem(last=False)

    def bit(self, target: K) -> int:
        """The target's bit, given one if it has none yet."""
        position = self._bits.get(target)
        if position is None:
            if self._free:
                position = heapq.heappop(self._free)
            else:
                position = self._next
                self._next += 1
            self._bits[target] = position
            self._owners[position] = target
        return 1 << position

    def owners(self, mask: int) -> Iterator[K]:
        """The targets whose bits are set in ``mask``."""
        while mask:
            low = mask & -mask
            yield self._owners[low.bit_length() - 1]
            mask ^= low

    def targets(self) -> list[K]:
        return list(self._bits)

    def drop(self, targets: Collection[K]) -> None:
        """Forget targets: clear their bits in every block and free them.

        One scan of the whole index, then work only on the target's own blocks: about
        10 ms per 100,000 blocks, paid when an instance leaves, not per request.
        """
        dead = 0
        for target in targets:
            position = self._bits.pop(target, None)
            if position is None:
                continue
            del self._owners[position]
            heapq.heappush(self._free, position)
            dead |= 1 << position
        if not dead:
            return
        blocks = self._blocks
        keep = ~dead
        for key in [key for key, held in blocks.items() if held & dead]:
            held = blocks[key] & keep
            if held:
                blocks[key] = held  # an existing key keeps its place in the LRU order
            else:
                del blocks[key]
