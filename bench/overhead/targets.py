"""The three targets of the overhead benchmark, each with its own simulated instances.

* ``floor``: simulated P and D instances alone (no heartbeats); the load generator sends
  both legs itself. Nothing can route a request with less work than this.
* ``moriio-proxy``: ``python -m moriio_proxy serve`` on ports it binds itself.
* ``vllm-router``: the Rust router from PyPI in its MoRI-IO mode. It takes explicit ports,
  so they are drawn at random below the ephemeral range and the launch is retried when one
  turns out to be taken (its log says so, or it exits).

Every target gets identical simulators (same role counts, mode, zero latency), started
fresh with it, so no target inherits another's connections or state.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moriio_proxy.protocol import Instance, parse_registration

from ..processes import (
    SimProcess,
    StartError,
    fresh_log,
    log_tail,
    spawn,
    start_proxy,
    start_sim,
    stop,
    wait_for_output,
)

ROUTER_STARTED_RE = re.compile(r"Starting server on")
ROUTER_PORT_TAKEN_RE = re.compile(r"Failed to bind ZMQ socket|Address already in use")
_PORT_RANGE = (20000, 32767)  # below Linux's ephemeral range (32768-60999 here)


@dataclass
class Target:
    name: str
    mode: str
    sims: list[SimProcess]
    proc: subprocess.Popen[bytes] | None = None  # None for the floor
    log: Path | None = None
    address: tuple[str, int] | None = None  # the target's HTTP address; None for the floor
    metrics_url: str | None = None  # its Prometheus endpoint, when it serves one apart
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def instances(self, role: str) -> tuple[Instance, ...]:
        return tuple(
            parse_registration(
                {
                    "type": s.role,
                    "http_address": s.http_address,
                    "zmq_address": s.zmq_address,
                    "transfer_mode": self.mode,
                }
            )
            for s in self.sims
            if s.role == role
        )

    def sim_stats(self) -> list[dict[str, Any]]:
        """Each simulator's counters (GET /sim/stats), to see how a target spread its load."""
        out = []
        for sim in self.sims:
            try:
                with urllib.request.urlopen(sim.url + "/sim/stats", timeout=5) as resp:
                    stats = json.loads(resp.read())
            except (OSError, ValueError) as exc:
                stats = {"unreadable": str(exc)}
            out.append({"role": sim.role, "url": sim.url, **stats})
        return out

    def alive(self) -> bool:
        procs = [s.proc for s in self.sims] + ([self.proc] if self.proc else [])
        return all(p.poll() is None for p in procs)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        for sim in self.sims:
            stop(sim.proc)


#: Extra ``moriio-proxy sim`` arguments per role ("P", "D"): identical for every target.
SimArgs = Mapping[str, Sequence[str]]


def _sims(
    name: str,
    mode: str,
    logs: Path,
    proxy: str | None,
    prefills: int,
    decodes: int,
    sim_args: SimArgs | None = None,
) -> list[SimProcess]:
    sims: list[SimProcess] = []
    try:
        for role, count in (("P", prefills), ("D", decodes)):
            extra = (sim_args or {}).get(role, ())
            for i in range(count):
                log = logs / f"{name}-{mode}-sim-{role}{i}.log"
                sims.append(start_sim(role, mode, log, proxy, extra))
    except BaseException:
        for sim in sims:
            stop(sim.proc)
        raise
    return sims


def _completion_ok(host: str, port: int) -> bool:
    body = json.dumps({"model": "sim-model", "prompt": "warm up", "max_tokens": 2}).encode()
    req = urllib.request.Request(
        f"http://{host}:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("choices"))
    except (OSError, ValueError):
        return False


def _wait_serving(target: Target, timeout: float = 30.0) -> None:
    """Until a completion goes through, then two heartbeats more, so every sim is known."""
    assert target.address is not None
    deadline = time.monotonic() + timeout
    while not _completion_ok(*target.address):
        if not target.alive():
            raise StartError(f"{target.name}: a process exited:\n{_tails(target)}")
        if time.monotonic() > deadline:
            raise StartError(f"{target.name}: no completion after {timeout:g} s\n{_tails(target)}")
        time.sleep(0.2)
    time.sleep(2.5)  # sims heartbeat every second: all of them are registered by now


def _tails(target: Target) -> str:
    logs = ([target.log] if target.log else []) + [s.log for s in target.sims]
    return "\n".join(f"--- {log.name}\n{log_tail(log, 8)}" for log in logs)


def start_floor(mode: str, logs: Path, prefills: int, decodes: int) -> Target:
    return Target("floor", mode, _sims("floor", mode, logs, None, prefills, decodes))


def start_moriio_proxy(
    mode: str,
    logs: Path,
    prefills: int,
    decodes: int,
    extra: Sequence[str] = (),
    *,
    name: str = "moriio-proxy",
    sim_args: SimArgs | None = None,
) -> Target:
    proxy = start_proxy(logs / f"{name}-{mode}.log", extra)
    target = Target(name, mode, [], proxy.proc, proxy.log, ("127.0.0.1", proxy.http_port))
    try:
        target.sims = _sims(name, mode, logs, proxy.discovery, prefills, decodes, sim_args)
        _wait_serving(target)
    except BaseException:
        target.stop()
        raise
    return target


def start_vllm_router(
    binary: str,
    mode: str,
    logs: Path,
    prefills: int,
    decodes: int,
    attempts: int = 5,
    *,
    name: str = "vllm-router",
    router_args: Sequence[str] = (),
    sim_args: SimArgs | None = None,
) -> Target:
    """vllm-router in MoRI-IO mode; new random ports and a new try when one was taken."""
    rng = random.Random()
    for attempt in range(1, attempts + 1):
        log = fresh_log(logs / f"{name}-{mode}.log")
        http, discovery, prometheus = rng.sample(range(*_PORT_RANGE), 3)
        args = [
            binary, "--vllm-pd-disaggregation", "--kv-connector", "moriio",
            "--vllm-discovery-address", f"127.0.0.1:{discovery}",
            "--host", "127.0.0.1", "--port", str(http),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus),
            "--log-level", "warning", *router_args,
        ]  # fmt: skip
        proc = spawn(args, log)
        target = Target(name, mode, [], proc, log, ("127.0.0.1", http))
        target.metrics_url = f"http://127.0.0.1:{prometheus}/metrics"
        try:
            wait_for_output(proc, log, (ROUTER_STARTED_RE,), timeout=30)
        except StartError as exc:
            stop(proc)
            if ROUTER_PORT_TAKEN_RE.search(str(exc)) and attempt < attempts:
                continue
            raise
        if ROUTER_PORT_TAKEN_RE.search(log.read_text(errors="replace")):
            stop(proc)
            continue
        if attempt > 1:
            target.notes.append(f"ports taken on {attempt - 1} launch(es); retried")
        try:
            target.sims = _sims(
                name, mode, logs, f"127.0.0.1:{discovery}", prefills, decodes, sim_args
            )
            _wait_serving(target)
        except BaseException:
            target.stop()
            raise
        return target
    raise StartError(f"vllm-router: its ports were taken on {attempts} launches")
