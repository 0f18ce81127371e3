"""Round robin: each instance in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..registry import Entry


class RoundRobin:
    """Each instance in turn; predictable, and fair when requests cost the same."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Entry]) -> Entry:
        return candidates[next(self._counter) % len(candidates)]
