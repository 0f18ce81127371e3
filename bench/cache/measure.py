"""One router's run of the workload, and what is reported of it.

The prefix-cache figures come from the simulated prefills themselves (``GET /sim/stats``,
read before and after the run, so the start-up check request does not count): tokens
looked up and found in the cache, tokens computed, prefill legs served. Latency comes from
the clients.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from ..overhead.targets import Target
from .client import TurnResult, play
from .workload import Conversation

_P_COUNTERS = ("requests", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_computed")


@dataclass
class RouterResult:
    """What one router did with the workload."""

    name: str
    router: str  # "moriio-proxy" or "vllm-router"
    policy: str
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    hit_rate: float = 0.0  # prefix-cache hits / lookups, in tokens, over every P
    ttft_mean_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    legs_per_p: list[int] = field(default_factory=list)
    computed_per_p: list[int] = field(default_factory=list)  # prompt tokens computed
    client_cached_tokens: int = 0  # the sum of usage...cached_tokens the clients saw
    router_metrics: list[str] = field(default_factory=list)  # its own routing counters
    notes: list[str] = field(default_factory=list)

    @property
    def leg_spread(self) -> float:
        """Busiest P's prefill legs over the mean (1.0: perfectly even)."""
        return _spread(self.legs_per_p)

    @property
    def work_spread(self) -> float:
        """Busiest P's computed prompt tokens over the mean."""
        return _spread(self.computed_per_p)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            leg_spread=round(self.leg_spread, 3),
            work_spread=round(self.work_spread, 3),
            req_per_s=round(self.req_per_s, 2),
        )
        return out


def _spread(values: list[int]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return max(values) / mean if mean else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _prefill_counters(target: Target) -> list[dict[str, int]]:
    out = []
    for stats in target.sim_stats():
        if stats["role"] != "P":
            continue
        if "unreadable" in stats:
            raise RuntimeError(f"{target.name}: {stats['url']}/sim/stats: {stats['unreadable']}")
        out.append({k: int(stats[k]) for k in _P_COUNTERS})
    return out


def run_router(
    target: Target,
    result: RouterResult,
    conversations: list[Conversation],
    users: int,
    answer_tokens: int,
) -> RouterResult:
    """Play every conversation through ``target``; fill ``result`` in."""
    assert target.address is not None
    before = _prefill_counters(target)
    started = time.monotonic()
    turns = asyncio.run(play(*target.address, conversations, users, answer_tokens))
    result.seconds = time.monotonic() - started
    after = _prefill_counters(target)
    deltas = [{k: a[k] - b[k] for k in _P_COUNTERS} for a, b in zip(after, before, strict=True)]
    _summarise(result, turns, deltas)
    if target.metrics_url is not None:
        result.router_metrics = _routing_counters(target.metrics_url)
    if not target.alive():
        result.notes.append("a process of this target exited during the run")
    return result


def _routing_counters(url: str) -> list[str]:
    """The router's own counts of its routing decisions (Prometheus lines), as evidence of
    what its policy did."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode(errors="replace")
    except OSError as exc:
        return [f"unreadable: {exc}"]
    return [
        line
        for line in text.splitlines()
        if not line.startswith("#") and re.search(r"decision|load_balanc|cache_aware", line)
    ]


def _summarise(result: RouterResult, turns: list[TurnResult], deltas: list[dict[str, int]]) -> None:
    result.requests = len(turns)
    errors: dict[str, int] = {}
    for t in turns:
        if t.error is not None:
            errors[t.error] = errors.get(t.error, 0) + 1
    result.errors = errors
    ok = [t for t in turns if t.error is None]
    if ok:
        ttfts = [t.ttft * 1000 for t in ok]
        result.ttft_mean_ms = statistics.fmean(ttfts)
        result.ttft_p50_ms = percentile(ttfts, 50)
        result.ttft_p99_ms = percentile(ttfts, 99)
    result.client_cached_tokens = sum(t.cached_tokens or 0 for t in ok)
    queries = sum(d["prefix_cache_queries"] for d in deltas)
    hits = sum(d["prefix_cache_hits"] for d in deltas)
    result.hit_rate = hits / queries if queries else 0.0
    result.legs_per_p = [d["requests"] for d in deltas]
    result.computed_per_p = [d["prompt_tokens_computed"] for d in deltas]
