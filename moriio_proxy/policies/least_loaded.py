"""Least loaded: power of two choices on the proxy's own in-flight counts."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..registry import Entry
from .context import Read, RoutingContext
from .targets import InstanceKey


class LeastLoaded:
    """Power of two choices on the proxy's own in-flight counts.

    Two random candidates, the less loaded wins: nearly as good as scanning for the
    minimum, and it does not stampede every new request onto one idle instance.
    """

    name = "least_loaded"
    reads: frozenset[Read] = frozenset()

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Entry:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        return a if a.total_inflight <= b.total_inflight else b

    def forget(self, key: InstanceKey) -> None:
        """Nothing per instance: loads live in the registry."""
