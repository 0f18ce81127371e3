"""The two phases: many idle streams held open, and many slow streams run to their end.

Idle: the simulated D sends each stream's first token and then goes silent (a stall fault
set at run time, after the warm-up). The cost of a stream the proxy merely holds is the
proxy's memory with N such streams open minus its memory before, over N. Closing them
must give the memory back and reach the simulator (its open requests fall to zero).

Slow: the simulated D sends a token every ``token latency`` seconds; N streams are opened
over a ramp and run to their end. From the moment the last stream got its first token
to the moment the first stream ended, all N are open at once: the steady window, over
which the proxy's memory must stay flat.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..overhead.loadgen import Prompt, prompts
from . import memtrace, probe, scrape
from .client import StreamProtocol, StreamRecord, Tracker, open_stream
from .deployment import Deployment
from .sampling import (
    LogWatch,
    Neighbours,
    Sample,
    cores,
    process_cores,
    sample,
    settled_memory,
    slope_per_minute,
    wait_until,
)

PATH = "/v1/completions"
STALL_FOREVER = {"stall_after_tokens": [1, "inf"]}


@dataclass(frozen=True)
class Load:
    """How many streams, how fast they start, what each asks for."""

    streams: int
    ramp_seconds: float
    max_tokens: int


async def open_ramp(
    deployment: Deployment, load: Load, tracker: Tracker, first_index: int = 0
) -> list[StreamProtocol]:
    """Open ``load.streams`` streams evenly over the ramp; returns their protocols (the
    ones that connected) once the last has been started."""
    pool = prompts(load.max_tokens, stream=True)
    host, port = "127.0.0.1", deployment.proxy.http_port
    interval = load.ramp_seconds / max(load.streams, 1)
    start = time.monotonic()
    tasks = []
    for i in range(load.streams):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        record = StreamRecord(first_index + i, _prompt(pool, first_index + i))
        tasks.append(asyncio.ensure_future(open_stream(host, port, PATH, record, tracker)))
    opened = await asyncio.gather(*tasks)
    return [p for p in opened if p is not None]


def _prompt(pool: Sequence[Prompt], index: int) -> Prompt:
    return pool[index % len(pool)]


async def warm_up(
    deployment: Deployment, requests: int, max_tokens: int, timeout: float
) -> dict[str, Any]:
    """``requests`` ordinary streams, 50 at a time, so that lazy imports, pools and
    caches are paid for before the baseline is read."""
    tracker = Tracker()
    batch = 50
    started = time.monotonic()
    for first in range(0, requests, batch):
        load = Load(min(batch, requests - first), 0.0, max_tokens)
        await open_ramp(deployment, load, tracker, first)
        await wait_until(lambda: tracker.finished >= tracker.opened, timeout)
    errors, samples = tracker.errors()
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "seconds": round(time.monotonic() - started, 1),
        "errors": dict(errors),
        "error_samples": samples,
    }


# ------------------------------------------------------------------------------- idle


async def idle_phase(
    deployment: Deployment,
    load: Load,
    rounds: int,
    hold: float,
    warmup: int,
    snapshots: Path | None = None,
) -> dict[str, Any]:
    """Open ``load.streams`` streams that go silent after their first token, read the
    proxy's memory and sockets, close them all, read it again; ``rounds`` times.

    ``snapshots``: the proxy runs under ``bench.streams.traced``; tracemalloc snapshots
    (written there) before and during the first round say where the memory went.
    """
    watch = LogWatch(deployment.proxy.log)
    out: dict[str, Any] = {"warmup": await warm_up(deployment, warmup, 16, timeout=120)}
    out["baseline"] = await settled_memory(deployment)
    pid = deployment.proxy.proc.pid
    before = memtrace.take(pid, snapshots, 1) if snapshots else None
    deployment.set_faults(deployment.decodes, STALL_FOREVER)
    out["rounds"] = []
    try:
        for r in range(rounds):
            trace = snapshots if r == 0 else None
            out["rounds"].append(await _idle_round(deployment, load, hold, r * load.streams, trace))
    finally:
        deployment.set_faults(deployment.decodes, {})
    if snapshots and before:
        held, after = snapshots / "2.tracemalloc", snapshots / "3.tracemalloc"
        out["tracemalloc"] = memtrace.attribute(before, held, after, load.streams)
    count, lines = watch.problems()
    out["proxy_log_problems"] = {"count": count, "first": lines}
    return out


async def _idle_round(
    deployment: Deployment, load: Load, hold: float, first_index: int, snapshots: Path | None
) -> dict[str, Any]:
    tracker = Tracker()
    before = await settled_memory(deployment)
    neighbours = Neighbours(deployment)
    started = time.monotonic()
    protocols = await open_ramp(deployment, load, tracker, first_index)
    n = load.streams
    all_first = await wait_until(lambda: tracker.first_events + tracker.finished >= n, 120)
    opened_in = time.monotonic() - started
    await asyncio.sleep(1.0)
    held = [await settled_memory(deployment)]
    await asyncio.sleep(max(0.0, hold - 2.0))  # the idle streams sit there...
    held.append(await settled_memory(deployment))  # ...and cost no more after a while
    if snapshots:
        memtrace.take(deployment.proxy.proc.pid, snapshots, 2)
    sockets = [s.as_dict() for s in deployment.sockets()]
    d_open = deployment.in_flight(deployment.decodes)
    held_for = time.monotonic() - started
    machine = neighbours.report()
    for protocol in protocols:
        protocol.close()
    closed = time.monotonic()
    released = await wait_until(lambda: _released(deployment), 60, every=0.5)
    released_in = time.monotonic() - closed
    await asyncio.sleep(2.0)
    after = await settled_memory(deployment)
    if snapshots:
        memtrace.take(deployment.proxy.proc.pid, snapshots, 3)
    errors, samples = tracker.errors(closed_ok=True)
    peak = max(held, key=lambda m: m["rss_mb"])
    return {
        "streams": n,
        "first_event": tracker.first_events,
        "all_first_event": all_first,
        "opened_seconds": round(opened_in, 1),
        "held_seconds": round(held_for, 1),
        "before": before,
        "held": held,
        "after": after,
        "rss_delta_mb": round(peak["rss_mb"] - before["rss_mb"], 2),
        "anon_delta_mb": round(peak["anon_mb"] - before["anon_mb"], 2),
        "mb_per_1000": round((peak["rss_mb"] - before["rss_mb"]) * 1000 / n, 2),
        "after_minus_before_mb": round(after["rss_mb"] - before["rss_mb"], 2),
        "sockets": sockets,
        "d_in_flight_held": d_open,
        "released": released,
        "released_seconds": round(released_in, 1),
        "sockets_after": [s.as_dict() for s in deployment.sockets()],
        "d_in_flight_after": deployment.in_flight(deployment.decodes),
        "errors": dict(errors),
        "error_samples": samples,
        "machine": machine,
    }


def _released(deployment: Deployment) -> bool:
    """No client or upstream connection left in the proxy, no request left in any D."""
    held = sum(s.clients + s.upstream_d for s in deployment.sockets())
    return held == 0 and deployment.in_flight(deployment.decodes) == 0


# ------------------------------------------------------------------------------- slow


async def slow_phase(
    deployment: Deployment, load: Load, token_latency: float, every: float, warmup: int
) -> dict[str, Any]:
    """Open ``load.streams`` slow streams over the ramp, sample every ``every`` seconds
    until all have ended, and judge every stream."""
    watch = LogWatch(deployment.proxy.log)
    out: dict[str, Any] = {"warmup": await warm_up(deployment, warmup, 2, timeout=120)}
    out["baseline"] = await settled_memory(deployment)
    out["roles"] = deployment.roles()
    tracker = Tracker()
    n = load.streams
    neighbours = Neighbours(deployment)
    metrics_before = scrape.metrics(deployment.proxy.url)
    ports = _listener_ports(deployment)
    queues: dict[str, tuple[int, int]] = {}
    opener = asyncio.ensure_future(open_ramp(deployment, load, tracker))
    samples: list[Sample] = [sample(deployment, tracker)]
    peak_sockets: dict[str, Any] | None = None
    limit = load.ramp_seconds + load.max_tokens * token_latency * 3 + 120
    deadline = samples[0].t + limit
    while tracker.finished < n and time.monotonic() < deadline:
        await asyncio.sleep(max(0.0, samples[-1].t + every - time.monotonic()))
        samples.append(sample(deployment, tracker))
        _note_queues(queues, ports)
        if peak_sockets is None and opener.done() and tracker.first_events >= n - tracker.finished:
            peak_sockets = _sockets_now(deployment, tracker)
        if deployment.dead():
            break
    out["machine"] = neighbours.report()
    out["proxy_metrics"] = _metrics_since(deployment, metrics_before)
    out["accept_queue_max"] = queues
    protocols = opener.result() if opener.done() else []
    opener.cancel()
    unfinished = n - tracker.finished
    for protocol in protocols:
        protocol.close()  # only streams still open past the deadline: counted as errors
    await wait_until(lambda: _released(deployment), 60, every=0.5)
    await asyncio.sleep(2.0)
    out["after"] = await settled_memory(deployment)
    errors, error_samples = tracker.errors()
    count, lines = watch.problems()
    out.update(
        streams=n,
        ramp_seconds=load.ramp_seconds,
        max_tokens=load.max_tokens,
        token_latency=token_latency,
        sample_every=every,
        unfinished=unfinished,
        errors=dict(errors),
        error_samples=error_samples,
        tokens_received=tracker.events,
        tokens_expected=n * load.max_tokens,
        gap_p50=tracker.gap_quantile(0.5),
        gap_p99=tracker.gap_quantile(0.99),
        gap_max=round(tracker.max_gap, 3),
        first_token=_quantiles([r.first_event - r.sent for r in tracker.records if r.events]),
        peak_sockets=peak_sockets,
        proxy_log_problems={"count": count, "first": lines},
        dead=deployment.dead(),
    )
    out.update(_steady(tracker, samples))
    return out


def _listener_ports(deployment: Deployment) -> dict[int, str]:
    """Listening port -> who listens: the proxy, each simulator."""
    ports = {deployment.proxy.http_port: "proxy"}
    for sim in deployment.sims:
        ports[Deployment.port(sim)] = f"{sim.role} {sim.url}"
    return ports


def _note_queues(queues: dict[str, tuple[int, int]], ports: dict[int, str]) -> None:
    """Keep the longest accept queue seen on each listener (and its backlog)."""
    for port, (queued, backlog) in scrape.accept_queues(ports).items():
        name = ports[port]
        if queued >= queues.get(name, (-1, 0))[0]:
            queues[name] = (queued, backlog)


def _metrics_since(deployment: Deployment, before: dict[str, float]) -> dict[str, Any]:
    """What the proxy's metrics say of the streams: leg times and upstream failures."""
    try:
        after = scrape.metrics(deployment.proxy.url)
    except OSError as exc:
        return {"unreadable": str(exc)}
    out: dict[str, Any] = {
        name: scrape.quantiles(before, after, name, (0.5, 0.99)) for name in scrape.HISTOGRAMS
    }
    out["counters"] = scrape.counters(before, after)
    return out


def _sockets_now(deployment: Deployment, tracker: Tracker) -> dict[str, Any]:
    """Every proxy process's descriptors and sockets, and each D's, with all streams open."""
    d_fds = {}
    for sim in deployment.decodes:
        (row,) = _sim_sockets(sim.proc.pid, Deployment.port(sim))
        d_fds[sim.url] = row
    return {
        "open_streams": tracker.open_streams(),
        "proxy": [s.as_dict() for s in deployment.sockets()],
        "decodes": d_fds,
    }


def _sim_sockets(pid: int, port: int) -> list[dict[str, int]]:
    """A simulator's descriptors; its "clients" are the proxy's upstream connections."""
    return [s.as_dict() for s in probe.sockets([pid], port, (), ())]


def _steady(tracker: Tracker, samples: list[Sample]) -> dict[str, Any]:
    """The steady window (every stream open) and what the samples say about it."""
    records = [r for r in tracker.records if r.events]
    t0 = samples[0].t
    timeline = []
    for a, b in itertools.pairwise(samples):
        timeline.append(
            {
                "t": round(b.t - t0, 1),
                "opened": b.opened,
                "open_streams": b.open_streams,
                "first_events": b.first_events,
                "events_per_s": round((b.events - a.events) / (b.t - a.t), 1),
                "rss_mb": round(b.rss_total, 2),
                "anon_mb": round(b.anon_total, 2),
                "rss_by_pid": {str(pid): round(v, 2) for pid, v in b.rss.items()},
                "cores": cores(a, b),
                "cores_by_pid": process_cores(a, b),
            }
        )
    out: dict[str, Any] = {"timeline": timeline, "steady": None}
    if not records or len(records) < len(tracker.records):
        return out  # a stream never started: there was no moment with all of them open
    all_open = max(r.first_event for r in records)
    first_end = min(r.last_event for r in records)
    window = [s for s in samples if all_open <= s.t <= first_end]
    if len(window) < 2:
        return out
    rss = [(s.t, s.rss_total) for s in window]
    anon = [(s.t, s.anon_total) for s in window]
    values = [v for _, v in rss]
    out["steady"] = {
        "mb_per_1000": round((values[0] - samples[0].rss_total) * 1000 / len(records), 2),
        "from_s": round(all_open - t0, 1),
        "to_s": round(first_end - t0, 1),
        "samples": len(window),
        "rss_first_mb": round(values[0], 2),
        "rss_last_mb": round(values[-1], 2),
        "rss_min_mb": round(min(values), 2),
        "rss_max_mb": round(max(values), 2),
        "rss_slope_mb_per_min": _round(slope_per_minute(rss)),
        "anon_slope_mb_per_min": _round(slope_per_minute(anon)),
        "cores": cores(window[0], window[-1]),
        "events_per_s": round(
            (window[-1].events - window[0].events) / (window[-1].t - window[0].t), 1
        ),
    }
    return out


def _quantiles(values: list[float]) -> dict[str, float] | None:
    """p50, p99 and max of ``values`` (seconds), None when there are none."""
    if not values:
        return None
    values = sorted(values)
    p50, p99 = (values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.99))
    return {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(values[-1], 2)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
