"""Choosing a prefill target (instance and DP rank) and a decode instance.

Policies are small interchangeable objects behind one interface per role (see
``interface``), one module each, and P and D each get their own, so the two sides
balance independently (as in SGLang's router). Each declares what of the request it
reads, and the proxy builds that ``RoutingContext`` once per request.
"""

from __future__ import annotations

import random

from .context import EMPTY, Read, RoutingContext, routing_context
from .interface import DecodePolicy, PrefillPolicy
from .least_loaded import LeastLoaded
from .ranks import InstanceOnly, Ranked, RankPicker
from .round_robin import RoundRobin
from .targets import Target

__all__ = [
    "EMPTY",
    "POLICIES",
    "DecodePolicy",
    "LeastLoaded",
    "PrefillPolicy",
    "RankPicker",
    "Ranked",
    "Read",
    "RoundRobin",
    "RoutingContext",
    "Target",
    "make_decode_policy",
    "make_prefill_policy",
    "routing_context",
]

POLICIES = ("round_robin", "least_loaded")


def make_prefill_policy(name: str, rng: random.Random | None = None) -> PrefillPolicy:
    """A prefill policy: it picks the DP rank too, each rank being its own engine."""
    return _make(name, rng, per_rank=True)


def make_decode_policy(name: str, rng: random.Random | None = None) -> DecodePolicy:
    """A decode policy: an instance only, since decode's DP balancer picks the rank."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded(rng)
    return InstanceOnly(_make(name, rng, per_rank=False))


def _make(name: str, rng: random.Random | None, *, per_rank: bool) -> PrefillPolicy:
    if name == "round_robin":
        return Ranked(RoundRobin(), per_rank=per_rank)
    fallback = Ranked(LeastLoaded(rng), per_rank=per_rank)
    if name == "least_loaded":
        return fallback
    raise ValueError(f"unknown policy {name!r}")
