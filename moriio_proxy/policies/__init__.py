"""Choosing a prefill target (instance and DP rank) and a decode instance.

Policies are small interchangeable objects behind one interface per role (see
``interface``), one module each, and P and D each get their own, so the two sides
balance independently (as in SGLang's router). Each declares what of the request it
reads, and the proxy builds that ``RoutingContext`` once per request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .cache_aware import CacheAware
from .context import EMPTY, Read, RoutingContext, routing_context
from .interface import DecodePolicy, PrefillPolicy
from .least_loaded import LeastLoaded
from .prefix_index import PrefixIndex
from .ranks import InstanceOnly, Ranked, RankPicker
from .round_robin import RoundRobin
from .session import SessionAffinity
from .targets import LoadBound, Target

__all__ = [
    "EMPTY",
    "POLICIES",
    "CacheAware",
    "DecodePolicy",
    "LeastLoaded",
    "LoadBound",
    "PolicySettings",
    "PrefillPolicy",
    "PrefixIndex",
    "RankPicker",
    "Ranked",
    "Read",
    "RoundRobin",
    "RoutingContext",
    "SessionAffinity",
    "Target",
    "make_decode_policy",
    "make_prefill_policy",
    "routing_context",
]

POLICIES = ("round_robin", "least_loaded", "cache_aware", "session")


@dataclass(frozen=True)
class PolicySettings:
    """The knobs of the affinity policies (see the README's settings table)."""

    bound: LoadBound = field(default_factory=LoadBound)
    block_chars: int = 128
    max_blocks: int = 1 << 18


def make_prefill_policy(
    name: str, settings: PolicySettings | None = None, rng: random.Random | None = None
) -> PrefillPolicy:
    """A prefill policy: it picks the DP rank too, each rank being its own cache."""
    return _make(name, settings or PolicySettings(), rng, per_rank=True)


def make_decode_policy(
    name: str, settings: PolicySettings | None = None, rng: random.Random | None = None
) -> DecodePolicy:
    """A decode policy: an instance only, since decode's DP balancer picks the rank."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(rng)
    return InstanceOnly(_make(name, settings or PolicySettings(), rng, per_rank=False))


def _make(
    name: str, settings: PolicySettings, rng: random.Random | None, *, per_rank: bool
) -> PrefillPolicy:
    if name == "round_robin":
        return Ranked(RoundRobin(), per_rank=per_rank)
    fallback = Ranked(LeastLoaded(rng), per_rank=per_rank)
    if name == "least_loaded":
        return fallback
    if name == "cache_aware":
        return CacheAware(
            per_rank=per_rank,
            fallback=fallback,
            bound=settings.bound,
            block_chars=settings.block_chars,
            max_blocks=settings.max_blocks,
            rng=rng,
        )
    if name == "session":
        return SessionAffinity(per_rank=per_rank, fallback=fallback, bound=settings.bound)
    raise ValueError(f"unknown policy {name!r}")
