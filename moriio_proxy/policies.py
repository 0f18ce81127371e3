"""Choosing a prefill instance, its DP rank, and a decode instance.

Policies are small interchangeable objects behind one method, and P and D each get their
own, so the two sides balance independently (as in SGLang's router).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Sequence
from typing import Protocol

from .registry import Entry


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Entry]) -> Entry:
        """Pick one of a non-empty sequence of candidates."""
        ...


class RoundRobin:
    """Each instance in turn; predictable, and fair when requests cost the same."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Entry]) -> Entry:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded:
    """Power of two choices on the proxy's own in-flight counts.

    Two random candidates, the less loaded wins: nearly as good as scanning for the
    minimum, and it does not stampede every new request onto one idle instance.
    """

    name = "least_loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Entry]) -> Entry:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        return a if a.total_inflight <= b.total_inflight else b


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(rng)
    raise ValueError(f"unknown policy {name!r}")


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
