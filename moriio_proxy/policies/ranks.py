"""The prefill DP rank, and the adapters between instance and target policies.

Which of an instance's data-parallel engines gets a prefill leg is the proxy's choice; a
decode's rank is not. ``Ranked`` adds the rank to an instance policy for prefill,
``InstanceOnly`` drops it from a target policy for decode.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..registry import Entry
from .context import RoutingContext
from .interface import DecodePolicy, PrefillPolicy
from .targets import InstanceKey, Target


class RankPicker:
    """The prefill DP rank with the fewest in-flight legs, ties broken in rotation.

    ``request_count % dp_size`` aliases when several instances share the counter (two
    DP8 instances reach only four ranks each); counting per ``(instance, rank)`` cannot.
    """

    def __init__(self) -> None:
        self._turn: dict[InstanceKey, int] = {}

    def pick(self, entry: Entry) -> int:
        size = entry.instance.dp_size
        if size == 1:
            return 0
        key = entry.instance.key
        start = self._turn.get(key, 0)
        self._turn[key] = (start + 1) % size
        order = [(start + i) % size for i in range(size)]
        return min(order, key=lambda rank: entry.inflight[rank])

    def forget(self, keys: Collection[InstanceKey]) -> None:
        for key in keys:
            self._turn.pop(key, None)


class Ranked:
    """An instance policy made a prefill policy: ``inner`` picks the instance, then
    RankPicker its least busy rank.

    With ``per_rank=False`` the rank is always 0: the form the target-level policies use
    for their fallback on the decode side, where ranks are not the proxy's to pick.
    """

    def __init__(self, inner: DecodePolicy, *, per_rank: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads = inner.reads
        self.per_rank = per_rank
        self._ranks = RankPicker()

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Target:
        entry = self.inner.choose(candidates, context)
        return Target(entry, self._ranks.pick(entry) if self.per_rank else 0)

    def forget(self, key: InstanceKey) -> None:
        self._ranks.forget([key])
        self.inner.forget(key)


class InstanceOnly:
    """A target policy used for decode: its choice of instance, without the rank (decode's
    own DP balancer picks that). Build the inner policy with ``per_rank=False``."""

    def __init__(self, inner: PrefillPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads = inner.reads

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Entry:
        return self.inner.choose(candidates, context).entry

    def forget(self, key: InstanceKey) -> None:
        self.inner.forget(key)
