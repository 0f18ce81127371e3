"""Where a leg can go, how loaded that place is, and when it is too loaded to prefer.

On the prefill side the unit of choice is an instance's DP rank: each rank is its own
engine with its own prefix cache and queue, and the proxy names the rank in a header.
On the decode side the instance's own DP balancer picks the rank, so the unit is the
instance. Policies that reason about places (cache holders, session owners) work on
targets of either kind; ``per_rank`` says which.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..protocol import Role
from ..registry import Entry

InstanceKey = tuple[Role, str]
TargetKey = tuple[Role, str, int]  # (role, http_address, rank); rank 0 when per instance


@dataclass(frozen=True, slots=True)
class Target:
    """A prefill choice: the instance and the DP rank whose engine gets the leg."""

    entry: Entry
    rank: int


def rank_count(entry: Entry, per_rank: bool) -> int:
    """How many targets an instance is: its DP ranks, or one when ranks are not ours."""
    return entry.instance.dp_size if per_rank else 1


def load(entry: Entry, rank: int, per_rank: bool) -> int:
    """In-flight legs on a target: the rank's own count, or the whole instance's."""
    return entry.inflight[rank] if per_rank else entry.total_inflight


def least_load(candidates: Sequence[Entry], per_rank: bool) -> int:
    """The lowest load of any target among the candidates."""
    if per_rank:
        return min(min(e.inflight[: e.instance.dp_size]) for e in candidates)
    return min(e.total_inflight for e in candidates)


def targets(candidates: Sequence[Entry], per_rank: bool) -> Iterator[tuple[Entry, int]]:
    for entry in candidates:
        for rank in range(rank_count(entry, per_rank)):
            yield entry, rank


@dataclass(frozen=True)
class LoadBound:
    """When a preferred target is too loaded to take the request.

    vllm-router's ``cache_aware`` semantics: a load counts as imbalanced only if it
    exceeds the least loaded target's by more than ``abs_threshold`` legs AND is more than
    ``rel_threshold`` times it. The absolute margin keeps a few legs of difference at low
    load from breaking affinity; the relative one scales the margin with the load.
    vllm-router compares the busiest worker with the idlest and then ignores the cache
    for every request; here the preferred target itself is compared, so one hot target
    does not turn off affinity for all the others.
    """

    abs_threshold: int = 2
    rel_threshold: float = 1.5

    def exceeded(self, load: int, least: int) -> bool:
        return load - least > self.abs_threshold and load > least * self.rel_threshold
