"""Cache aware: send a prompt where its prefix was sent before, unless that place is busy.

Prefill is the expensive leg, and vLLM's prefix cache makes a prompt whose prefix an
engine already computed nearly free there; spreading requests by load alone finds that
engine one time in N. This policy remembers which target (instance and DP rank: each
rank has its own cache) was sent which prefixes (``PrefixIndex``) and prefers the one
holding the longest prefix of the request, within a load bound; anything it cannot
place by cache goes to the least loaded target, and is remembered there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..registry import Entry
from .context import Read, RoutingContext
from .interface import PrefillPolicy
from .prefix_index import PrefixIndex
from .targets import InstanceKey, LoadBound, Target, TargetKey, least_load, load, rank_count


class CacheAware:
    """Longest indexed prefix wins; ties and overloads go by load.

    Among the targets holding the longest prefix the least loaded is preferred (ties at
    random, so a prefix every target holds, such as a shared system prompt, does not
    pile new conversations onto one). If even that target's load is over ``bound``
    relative to the least loaded target, ``fallback`` chooses instead.
    """

    name = "cache_aware"
    reads: frozenset[Read] = frozenset({"text"})

    def __init__(
        self,
        *,
        per_rank: bool,
        fallback: PrefillPolicy,
        bound: LoadBound,
        block_chars: int,
        max_blocks: int,
        rng: random.Random | None = None,
    ) -> None:
        self.per_rank = per_rank
        self.index: PrefixIndex[TargetKey] = PrefixIndex(block_chars, max_blocks)
        self._fallback = fallback
        self._bound = bound
        self._rng = rng or random.Random()
        self._masks: dict[InstanceKey, tuple[int, int]] = {}  # key -> (targets, their bits)

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Target:
        text = context.text
        hashes = self.index.hashes(text) if text else None
        if not hashes:  # no prompt, or shorter than a block: nothing to match or remember
            return self._fallback.choose(candidates, context)
        _, holders = self.index.match(hashes, self._allowed(candidates))
        target = self._holder(candidates, holders) if holders else None
        if target is None:
            target = self._fallback.choose(candidates, context)
        instance = target.entry.instance
        self.index.record(hashes, (instance.role, instance.http_address, target.rank))
        return target

    def forget(self, key: InstanceKey) -> None:
        self._masks.pop(key, None)
        self.index.drop([t for t in self.index.targets() if (t[0], t[1]) == key])
        self._fallback.forget(key)

    def _allowed(self, candidates: Sequence[Entry]) -> int:
        """The bits of every target on the candidates (cached per instance and size)."""
        allowed = 0
        masks = self._masks
        for entry in candidates:
            instance = entry.instance
            count = rank_count(entry, self.per_rank)
            known = masks.get(instance.key)
            if known is None or known[0] != count:
                mask = 0
                for rank in range(count):
                    mask |= self.index.bit((instance.role, instance.http_address, rank))
                known = masks[instance.key] = (count, mask)
            allowed |= known[1]
        return allowed

    def _holder(self, candidates: Sequence[Entry], holders: int) -> Target | None:
        """The least loaded holder, or None if it is over the load bound."""
        by_key = {e.instance.key: e for e in candidates}
        best: list[Target] = []
        best_load = 0
        for role, address, rank in self.index.owners(holders):
            entry = by_key.get((role, address))
            if entry is None or rank >= rank_count(entry, self.per_rank):
                continue
            current = load(entry, rank, self.per_rank)
            if not best or current < best_load:
                best, best_load = [Target(entry, rank)], current
            elif current == best_load:
                best.append(Target(entry, rank))
        if not best or self._bound.exceeded(best_load, least_load(candidates, self.per_rank)):
            return None
        return best[0] if len(best) == 1 else self._rng.choice(best)
