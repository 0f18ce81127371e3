"""Choosing a prefill instance, its DP rank, and a decode instance.

Policies are small interchangeable objects behind one method, one module each, and P and
D each get their own, so the two sides balance independently (as in SGLang's router).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from ..registry import Entry
from .least_loaded import LeastLoaded
from .ranks import RankPicker
from .round_robin import RoundRobin

__all__ = ["POLICIES", "LeastLoaded", "Policy", "RankPicker", "RoundRobin", "make_policy"]

POLICIES = ("round_robin", "least_loaded")


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Entry]) -> Entry:
        """Pick one of a non-empty sequence of candidates."""
        ...


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(rng)
    raise ValueError(f"unknown policy {name!r}")
