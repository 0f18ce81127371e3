"""The prefill DP rank: which of an instance's data-parallel engines gets the leg."""

from __future__ import annotations

from collections.abc import Collection

from ..registry import Entry


class RankPicker:
    """The prefill DP rank with the fewest in-flight legs, ties broken in rotation.

    ``request_count % dp_size`` aliases when several instances share the counter (two
    DP8 instances reach only four ranks each); counting per ``(instance, rank)`` cannot.
    """

    def __init__(self) -> None:
        self._turn: dict[tuple[str, str], int] = {}

    def pick(self, entry: Entry) -> int:
        size = entry.instance.dp_size
        if size == 1:
            return 0
        key = entry.instance.key
        start = self._turn.get(key, 0)
        self._turn[key] = (start + 1) % size
        order = [(start + i) % size for i in range(size)]
        return min(order, key=lambda rank: entry.inflight[rank])

    def forget(self, keys: Collection[tuple[str, str]]) -> None:
        for key in keys:
            self._turn.pop(key, None)
