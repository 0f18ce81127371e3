"""Round robin: each instance in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..registry import Entry
from .context import Read, RoutingContext
from .targets import InstanceKey


class RoundRobin:
    """Each instance in turn; predictable, and fair when requests cost the same."""

    name = "round_robin"
    reads: frozenset[Read] = frozenset()

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Entry:
        return candidates[next(self._counter) % len(candidates)]

    def forget(self, key: InstanceKey) -> None:
        """Nothing per instance: the counter is shared."""
