"""The two policy interfaces: what a prefill policy and a decode policy return.

Both see the routable candidates and the request's ``RoutingContext``. A prefill policy
returns a ``Target``, the instance AND the DP rank: the proxy names the rank in the
prefill leg's header, and each rank is an engine with its own prefix cache, so where
affinity matters the rank is part of the choice. A decode policy returns an instance
only: decode's rank is picked by that instance's own DP balancer, so it is not the
proxy's to choose and does not appear in the type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..registry import Entry
from .context import Read, RoutingContext
from .targets import InstanceKey, Target


class DecodePolicy(Protocol):
    """Chooses an instance. Also the shape of the instance-level prefill policies, which
    ``Ranked`` turns into prefill policies by adding the rank."""

    name: str
    reads: frozenset[Read]  # which parts of the request the policy looks at

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Entry:
        """Pick one of a non-empty sequence of candidates."""
        ...

    def forget(self, key: InstanceKey) -> None:
        """Drop all state about an instance that left the registry."""
        ...


class PrefillPolicy(Protocol):
    """Chooses an instance and the DP rank that gets the prefill leg."""

    name: str
    reads: frozenset[Read]

    def choose(self, candidates: Sequence[Entry], context: RoutingContext) -> Target:
        """Pick a target on one of a non-empty sequence of candidates."""
        ...

    def forget(self, key: InstanceKey) -> None:
        """Drop all state about an instance that left the registry."""
        ...
