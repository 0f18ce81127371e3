"""Samples taken while streams are open: the proxy's memory, everyone's CPU, stream counts.

A sample is cheap enough (a few /proc reads, a few milliseconds) to take every few seconds
from the load generator's own event loop; it delays the streams' reads by that much once,
which shows in no figure here. Descriptor and socket counts walk every descriptor of the
proxy (tens of thousands at the peak) and are taken once per phase, not per sample.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processes import machine_busy_seconds, tree_cpu_seconds
from . import probe
from .client import Tracker
from .deployment import Deployment

MB = 1e6  # the targets are in MB; every figure here is in MB of 10^6 bytes
_LOG_PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |^Traceback", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic()
    opened: int
    open_streams: int
    first_events: int
    events: int
    rss: dict[int, float]  # pid -> MB, the proxy's processes
    anon: dict[int, float]
    cpu: dict[str, float]  # group -> CPU seconds so far: proxy, P, D, loadgen, machine
    proxy_cpu: dict[int, float]  # pid -> CPU seconds so far of each proxy process itself

    @property
    def rss_total(self) -> float:
        return sum(self.rss.values())

    @property
    def anon_total(self) -> float:
        return sum(self.anon.values())


def cpu_now(deployment: Deployment) -> dict[str, float]:
    """CPU seconds used so far by the proxy's tree, the P and D simulators, this process
    (the load generator and the sampling) and the whole machine."""
    roots = {
        "proxy": [deployment.proxy.proc.pid],
        "P": [s.proc.pid for s in deployment.prefills],
        "D": [s.proc.pid for s in deployment.decodes],
    }
    seconds = tree_cpu_seconds([pid for pids in roots.values() for pid in pids])
    out = {group: sum(seconds.get(pid, 0.0) for pid in pids) for group, pids in roots.items()}
    out["loadgen"] = time.process_time()
    out["machine"] = machine_busy_seconds()
    return out


def machine_cores(seconds: float = 3.0) -> float:
    """Cores the whole machine used over the next ``seconds`` (blocking): before a phase
    starts anything, that is other work's."""
    start, began = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return round((machine_busy_seconds() - start) / (time.monotonic() - began), 2)


def sample(deployment: Deployment, tracker: Tracker) -> Sample:
    pids = deployment.proxy_pids()
    rows = probe.memory(pids)
    return Sample(
        time.monotonic(),
        tracker.opened,
        tracker.open_streams(),
        tracker.first_events,
        tracker.events,
        {r.pid: r.rss_kib * 1024 / MB for r in rows},
        {r.pid: r.anon_kib * 1024 / MB for r in rows},
        cpu_now(deployment),
        probe.own_cpu(pids),
    )


def memory_row(deployment: Deployment) -> dict[str, Any]:
    """The proxy's memory now: totals and each process, in MB."""
    rows = probe.memory(deployment.proxy_pids())
    rss, anon = probe.total_kib(rows)
    return {
        "rss_mb": round(rss * 1024 / MB, 2),
        "anon_mb": round(anon * 1024 / MB, 2),
        "processes": [
            {
                "pid": r.pid,
                "name": r.name,
                "rss_mb": round(r.rss_kib * 1024 / MB, 2),
                "anon_mb": round(r.anon_kib * 1024 / MB, 2),
                "threads": r.threads,
            }
            for r in rows
        ],
    }


async def settled_memory(deployment: Deployment, samples: int = 3) -> dict[str, Any]:
    """The proxy's memory once it stops moving: the last of a few samples a second apart
    (and the spread of them, to show it had settled)."""
    rows = []
    for i in range(samples):
        if i:
            await asyncio.sleep(1.0)
        rows.append(memory_row(deployment))
    last = dict(rows[-1])
    last["spread_mb"] = round(max(r["rss_mb"] for r in rows) - min(r["rss_mb"] for r in rows), 2)
    return last


def cores(a: Sample, b: Sample) -> dict[str, float]:
    """Cores each group used between two samples; ``others``: the machine minus ours."""
    dt = b.t - a.t
    if dt <= 0:
        return {}
    used = {k: (b.cpu[k] - a.cpu[k]) / dt for k in a.cpu}
    ours = sum(v for k, v in used.items() if k != "machine")
    used["others"] = max(0.0, used["machine"] - ours)
    return {k: round(v, 3) for k, v in used.items()}


def process_cores(a: Sample, b: Sample) -> dict[str, float]:
    """Cores each proxy process used between two samples (pid as text, a JSON key)."""
    dt = b.t - a.t
    if dt <= 0:
        return {}
    return {
        str(pid): round((b.proxy_cpu[pid] - a.proxy_cpu[pid]) / dt, 3)
        for pid in b.proxy_cpu
        if pid in a.proxy_cpu
    }


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None under two points."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


class LogWatch:
    """Warnings, errors and tracebacks a log gained since the watch began."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0

    def problems(self, limit: int = 5) -> tuple[int, list[str]]:
        try:
            with self.log.open("rb") as handle:
                handle.seek(self.offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return 0, []
        found = [line for line in text.splitlines() if _LOG_PROBLEM.match(line)]
        return len(found), found[:limit]


class Neighbours:
    """What the rest of the machine did while a phase ran: the processes this run did
    not start that used the most CPU, and the TCP counters of the network namespace (a
    full accept queue drops connections without any process seeing it)."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.started = time.monotonic()
        self.cpu = probe.process_cpu()
        self.tcp = probe.tcp_counters()

    def _ours(self) -> set[int]:
        dep = self.deployment
        roots = [os.getpid(), dep.proxy.proc.pid] + [s.proc.pid for s in dep.sims]
        return {pid for root in roots for pid in probe.tree(root)}

    def report(self, top: int = 5) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        ours = self._ours()
        spent = probe.cpu_between(self.cpu, probe.process_cpu())
        used = {pid: cpu for pid, cpu in spent.items() if pid not in ours and cpu > 0}
        busiest = sorted(used, key=lambda pid: used[pid], reverse=True)[:top]
        tcp = probe.tcp_counters()
        return {
            "seconds": round(seconds, 1),
            "tcp": {name: tcp[name] - self.tcp.get(name, 0) for name in tcp},
            "others_top": [
                {"pid": pid, "cores": round(used[pid] / seconds, 3), "command": probe.command(pid)}
                for pid in busiest
            ],
        }


async def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True
