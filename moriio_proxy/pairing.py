"""Choosing the (prefill, DP rank, decode) pair for one attempt, among pairs that can work.

The routing policies choose a prefill target and a decode instance each on their own
terms (load, cache affinity, sessions). Not every prefill can serve with every decode:
TP sizes and vLLM versions decide (``versions.pair_problem``), and a pair that cannot work
fails badly (a dead engine, decodes that wait forever), so it is never formed. The prefill
is chosen first, as before; the decode policy then only sees the decodes that fit it. When
none fits, the prefill policy chooses again among the prefills that have a fitting decode:
the prefill's choice carries the cache affinity, and a deployment that mixes TP sizes or
versions usually does so on one side only, so this keeps the policies' preferences
wherever a working pair allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .policies import DecodePolicy, PrefillPolicy, RoutingContext
from .protocol import TransferMode
from .registry import Entry, Registry
from .versions import pair_problem


class NoPairError(Exception):
    """No routable pair exists; the message says what is missing or why none can work."""


@dataclass
class Pair:
    """The instances one attempt uses, and the transfer mode in force."""

    prefill: Entry
    rank: int
    decode: Entry
    mode: TransferMode


class PairChooser:
    """The policies of both roles, applied to what the registry can route and can pair."""

    def __init__(
        self, registry: Registry, prefill_policy: PrefillPolicy, decode_policy: DecodePolicy
    ) -> None:
        self.registry = registry
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        registry.instance_removed.connect(self._forget, sender=registry, weak=False)

    def _forget(self, _sender: Any, entry: Entry, **_: Any) -> None:
        self.prefill_policy.forget(entry.instance.key)
        self.decode_policy.forget(entry.instance.key)

    def choose(self, excluded: set[tuple[str, str]], context: RoutingContext) -> Pair:
        """A pair of routable instances outside ``excluded``; NoPairError when none."""
        prefills = [e for e in self.registry.routable("P") if e.instance.key not in excluded]
        decodes = [e for e in self.registry.routable("D") if e.instance.key not in excluded]
        if not prefills or not decodes:
            missing = " and ".join(
                name for name, group in (("prefill", prefills), ("decode", decodes)) if not group
            )
            raise NoPairError(
                f"no {missing} instance is available; check that vLLM instances are running "
                "with MoRIIOConnector and proxy_ip/proxy_ping_port pointing at this proxy"
            )
        mode = self.registry.mode or prefills[0].instance.transfer_mode
        target = self.prefill_policy.choose(prefills, context)
        fitting = fitting_decodes(target.entry, decodes, mode)
        if not fitting:
            others = [p for p in prefills if fitting_decodes(p, decodes, mode)]
            if not others:
                raise NoPairError(
                    "no prefill and decode instance can work together: "
                    + _why(prefills[0], decodes[0], mode)
                )
            target = self.prefill_policy.choose(others, context)
            fitting = fitting_decodes(target.entry, decodes, mode)
        decode = self.decode_policy.choose(fitting, context)
        return Pair(target.entry, target.rank, decode, mode)


def fitting_decodes(
    prefill: Entry, decodes: Sequence[Entry], mode: TransferMode
) -> Sequence[Entry]:
    """The decodes that can work with ``prefill``; the same sequence when all can.

    Runs on every request, so the usual fleet (one TP size, one version) costs one
    comparison per decode and no new list.
    """
    tp, release = prefill.instance.tp_size, prefill.release
    if all(d.instance.tp_size == tp and d.release == release for d in decodes):
        return decodes
    return [
        d
        for d in decodes
        if pair_problem(prefill.instance, d.instance, mode, release, d.release) is None
    ]


def unpaired_reason(entry: Entry, peers: Sequence[Entry], mode: TransferMode) -> str | None:
    """Why ``entry`` can serve with none of ``peers`` (the live instances of the other
    role), or None when it can serve with one of them, or when there are none to judge."""
    if not peers:
        return None
    problems: dict[str, list[str]] = {}
    is_prefill = entry.instance.role == "P"
    for peer in peers:
        problem = _problem(entry, peer, mode) if is_prefill else _problem(peer, entry, mode)
        if problem is None:
            return None
        problems.setdefault(problem, []).append(peer.instance.http_address)
    other = "decode" if is_prefill else "prefill"
    return f"no live {other} instance can work with it: " + "; ".join(
        f"{', '.join(addresses)}: {problem}" for problem, addresses in problems.items()
    )


def _problem(prefill: Entry, decode: Entry, mode: TransferMode) -> str | None:
    return pair_problem(prefill.instance, decode.instance, mode, prefill.release, decode.release)


def _why(prefill: Entry, decode: Entry, mode: TransferMode) -> str:
    problem = _problem(prefill, decode, mode)
    return (
        f"prefill {prefill.instance.http_address} with decode {decode.instance.http_address}: "
        f"{problem}"
    )
