"""Session affinity: every request of a session to the same target, by consistent hashing.

A client that names its conversation (a session header, or OpenAI's ``user`` field) has
its requests sent to one target (instance and DP rank), where its history's KV stays in
the prefix cache. The owner is chosen by rendezvous hashing: each target scores
``mix(hash(session) XOR hash(target))`` and the highest wins. When a target joins or
leaves only the sessions it wins or owned move (1/N of them), and no table of sessions
is kept: memory is one hash per target. The hashes are BLAKE2, not Python's salted
``hash``, so every proxy process and replica sends a session to the same place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..registry import Entry
from .context import Read, RoutingContext
from .interface import PrefillPolicy
from .targets import InstanceKey, LoadBound, Target, least_load, load, rank_count

_MASK64 = (1 << 64) - 1
_MULTIPLIER = 0xFF51AFD7ED558CCD  # MurmurHash3's finaliser constant: odd, well mixed


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def score(session: int, target: int) -> int:
    """Rendezvous weight of a target for a session.

    A multiply and a fold spread the XOR of two uniform hashes well enough that targets
    win equal shares (tested); it is a few integer operations per target per request.
    """
    mixed = ((session ^ target) * _MULTIPLIER) & _MASK64
    return mixed ^ (mixed >> 32)


class SessionAffinity:
    """Pins a session to its rendezvous owner; requests without a session, and those
    whose owner is over the load bound, go to ``fallback`` (least loaded)."""

    name = "session"
    reads: frozenset[Read] = frozenset({"session"})

    def __init__(self, *, per_rank: bool, fallback: PrefillPolicy, bound: LoadBound) -> None:
        self.per_rank = per_rank
        self._fallback = fallback
        self._bound = bound
        self._hashes: dict[InstanceKey, list[int]] = {}  # per instance, one per target

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Target:
        if context.session is None:
            return self._fallback.choose(candidates, context)
        owner = self.owner(candidates, context.session)
        owner_load = load(owner.entry, owner.rank, self.per_rank)
        if self._bound.exceeded(owner_load, least_load(candidates, self.per_rank)):
            return self._fallback.choose(candidates, context)
        return owner

    def owner(self, candidates: Sequence[Entry], session: str) -> Target:
        """The session's target among the candidates, regardless of load."""
        point = stable_hash(session)
        best_score = -1
        best: tuple[Entry, int] = (candidates[0], 0)
        for entry in candidates:
            for rank, target in enumerate(self._target_hashes(entry)):
                weight = score(point, target)
                if weight > best_score:
                    best_score, best = weight, (entry, rank)
        return Target(*best)

    def forget(self, key: InstanceKey) -> None:
        self._hashes.pop(key, None)
        self._fallback.forget(key)

    def _target_hashes(self, entry: Entry) -> list[int]:
        instance = entry.instance
        count = rank_count(entry, self.per_rank)
        known = self._hashes.get(instance.key)
        if known is None or len(known) != count:
            address = instance.http_address
            known = [stable_hash(f"{address}#{rank}") for rank in range(count)]
            self._hashes[instance.key] = known
        return known
