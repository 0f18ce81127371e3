"""One cell of the table: one target, mode, streaming or not, and concurrency, measured.

The load generator's workers run the cell; meanwhile this process sleeps until the measured
window opens, reads the CPU counters of every process involved, sleeps until it closes and
reads them again. CPU per request is the target's CPU over the window divided by the
requests completed in it. That figure hardly moves when other work shares the machine,
where requests per second do: it is the one to compare across runs.

A cell is measured in rounds (each with its own warm-up) interleaved with the other
targets' rounds of the same cell, so a burst of other work on the machine lands on every
target alike rather than on one; ``summarize`` pools the rounds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moriio_proxy.protocol import TransferMode

from ..processes import machine_busy_seconds, tree_cpu_seconds
from .loadgen import Job, Outcome, Window
from .targets import Target
from .workers import WorkerPool, split_users

# A single-threaded process at this share of one core is saturated: it sets the pace.
SATURATED_CORES = 0.85
# Other tenants' CPU above this (cores) makes a cell's figures noisier than usual.
NOISY_OTHERS_CORES = 0.25


@dataclass(frozen=True)
class Cell:
    mode: TransferMode
    stream: bool
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.mode} {'stream' if self.stream else 'non-stream'} c={self.concurrency}"


@dataclass(frozen=True)
class Settings:
    max_tokens: int
    warmup: float
    duration: float
    grace: float = 15.0


@dataclass(frozen=True)
class _Sample:
    when: float
    cpu: dict[int, float]  # pid -> CPU seconds of its process tree
    machine: float


def _sample(pids: list[int]) -> _Sample:
    return _Sample(time.monotonic(), tree_cpu_seconds(pids), machine_busy_seconds())


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


@dataclass(frozen=True)
class Measurement:
    """One round of one cell against one target: what the clients saw, and the CPU used."""

    outcome: Outcome
    seconds: float  # between the two CPU samples (the window, give or take a millisecond)
    target_cpu: float | None  # CPU seconds in the window; None for the floor
    sims_cpu: list[float]  # per simulator, in the order of Target.sims
    loadgen_cpu: list[float]  # per load-generator worker that ran
    machine_cpu: float  # every process on the machine
    ours_cpu: float  # this run's processes (all of the above, and idle targets)


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list, in milliseconds."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 2)


def run_cell(
    pool: WorkerPool,
    target: Target,
    cell: Cell,
    settings: Settings,
    during: Callable[[Window], None] | None = None,
) -> Measurement:
    """One round of ``cell`` against ``target``; ``during`` (a profiler) starts with the window."""
    kind: Literal["target", "floor"] = "floor" if target.address is None else "target"
    jobs = [
        Job(
            kind,
            cell.mode,
            cell.stream,
            settings.max_tokens,
            users,
            first,
            target.address,
            target.instances("P"),
            target.instances("D"),
        )
        for first, users in split_users(cell.concurrency, pool.size)
    ]
    sims = [s.proc.pid for s in target.sims]
    workers = pool.pids[: len(jobs)]
    ours = os.getpid()  # this process and all it started
    pids = [*([target.pid] if target.pid else []), *sims, *workers, ours]
    samples: list[_Sample] = []

    def window_from(now: float) -> Window:
        start = now + 0.1
        measure = start + settings.warmup
        return Window(start, measure, measure + settings.duration, settings.grace)

    def measure(window: Window) -> None:
        _sleep_until(window.measure)
        samples.append(_sample(pids))
        if during is not None:
            during(window)
        _sleep_until(window.stop)
        samples.append(_sample(pids))

    outcome = pool.run(jobs, window_from, measure)
    before, after = samples

    def used(pid: int) -> float:
        return after.cpu.get(pid, 0.0) - before.cpu.get(pid, 0.0)

    return Measurement(
        outcome,
        after.when - before.when,
        used(target.pid) if target.pid else None,
        [used(pid) for pid in sims],
        [used(pid) for pid in workers],
        after.machine - before.machine,
        used(ours),
    )


def summarize(
    target: Target, cell: Cell, settings: Settings, rounds: list[Measurement]
) -> dict[str, Any]:
    """One row of the results from all rounds of a cell against a target, pooled."""
    outcome = Outcome()
    for m in rounds:
        outcome.merge(m.outcome)
    ok = len(outcome.latencies)
    seconds = sum(m.seconds for m in rounds)

    def per_req(cpu_s: float) -> float | None:
        return round(cpu_s * 1000 / ok, 3) if ok else None

    def cores(cpu_s: float) -> float:
        return round(cpu_s / seconds, 3) if seconds else 0.0

    sims = []
    for i, sim in enumerate(target.sims):
        spent = sum(m.sims_cpu[i] for m in rounds)
        name = f"{sim.role}{sum(1 for s in target.sims[:i] if s.role == sim.role)}"
        sims.append({"sim": name, "cores": cores(spent), "ms_per_req": per_req(spent)})
    sims_total = sum(sum(m.sims_cpu) for m in rounds)
    loadgen_total = sum(sum(m.loadgen_cpu) for m in rounds)
    workers = max(len(m.loadgen_cpu) for m in rounds)
    worker_cores = [
        cores(sum(m.loadgen_cpu[w] for m in rounds if w < len(m.loadgen_cpu)))
        for w in range(workers)
    ]
    target_cpu = sum(m.target_cpu or 0.0 for m in rounds) if target.pid else None
    machine = sum(m.machine_cpu for m in rounds)
    others = sum(max(0.0, m.machine_cpu - m.ours_cpu) for m in rounds)
    cpu: dict[str, Any] = {
        "target_ms_per_req": per_req(target_cpu) if target_cpu is not None else None,
        "target_cores": cores(target_cpu) if target_cpu is not None else None,
        "sims_ms_per_req": per_req(sims_total),
        "sims_cores": cores(sims_total),
        "sims": sims,
        "loadgen_ms_per_req": per_req(loadgen_total),
        "loadgen_cores": cores(loadgen_total),
        "loadgen_workers_cores": worker_cores,
        "machine_busy_cores": cores(machine),
        "others_cores": cores(others),
        "others_cores_per_round": [
            round(max(0.0, m.machine_cpu - m.ours_cpu) / m.seconds, 3) for m in rounds
        ],
        "seconds_sampled": round(seconds, 3),
    }
    latencies = sorted(outcome.latencies)
    ttfts = sorted(outcome.ttfts)
    errors = dict(sorted(outcome.errors.items()))
    per_round = [round(len(m.outcome.latencies) / settings.duration, 1) for m in rounds]
    return {
        "target": target.name,
        "mode": cell.mode,
        "stream": cell.stream,
        "concurrency": cell.concurrency,
        "max_tokens": settings.max_tokens,
        "rounds": len(rounds),
        "window_seconds": settings.duration,
        "ok": ok,
        "sent_including_warmup": outcome.sent,
        "req_per_s": round(ok / (settings.duration * len(rounds)), 1),
        "req_per_s_per_round": per_round,
        "latency_ms": {
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": percentile(latencies, 1.0),
            "mean": round(sum(latencies) / ok * 1000, 2) if ok else None,
        },
        "ttft_ms": (
            {"p50": percentile(ttfts, 0.50), "p99": percentile(ttfts, 0.99)}
            if cell.stream
            else None
        ),
        "errors": errors,
        "errors_total": sum(errors.values()),
        "id_leaks": outcome.leaks if target.address is not None else None,
        "error_samples": outcome.error_samples,
        "cpu": cpu,
        "saturated": _saturated(cpu, target),
    }


def _saturated(cpu: dict[str, Any], target: Target) -> list[str]:
    """What set the pace, or may have: single-threaded processes at one core, a full machine."""
    notes = []
    if target.name == "moriio-proxy" and (cpu["target_cores"] or 0) >= SATURATED_CORES:
        notes.append(f"target at {cpu['target_cores']} cores (one event loop: saturated)")
    for sim in cpu["sims"]:
        if sim["cores"] >= SATURATED_CORES:
            notes.append(f"sim {sim['sim']} at {sim['cores']} cores")
    for i, worker in enumerate(cpu["loadgen_workers_cores"]):
        if worker >= SATURATED_CORES:
            notes.append(f"load generator {i} at {worker} cores")
    ncpu = os.cpu_count() or 1
    if cpu["machine_busy_cores"] >= 0.95 * ncpu:
        notes.append(f"machine busy {cpu['machine_busy_cores']}/{ncpu} cores")
    if cpu["others_cores"] >= NOISY_OTHERS_CORES:
        notes.append(f"other processes used {cpu['others_cores']} cores")
    return notes
