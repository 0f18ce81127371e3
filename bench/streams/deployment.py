"""The proxy under test and its simulated instances, each a process of its own.

Every simulator gets a control port (``--control-port 0``): the idle phase turns a stall on
and off there while the instance keeps serving, and ``/sim/stats`` there says how many
requests each instance still has open, which is how a hang-up is seen to reach vLLM.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processes import (
    ProxyProcess,
    SimProcess,
    StartError,
    log_tail,
    start_proxy,
    start_sim,
    stop,
)
from . import probe


@dataclass
class Deployment:
    proxy: ProxyProcess
    prefills: list[SimProcess]
    decodes: list[SimProcess]

    @property
    def sims(self) -> list[SimProcess]:
        return self.prefills + self.decodes

    def proxy_pids(self) -> list[int]:
        """The proxy's process tree: the serving process, or the supervisor and workers."""
        return probe.tree(self.proxy.proc.pid)

    def roles(self) -> dict[str, str]:
        """pid (as text, a JSON key) -> what that process of the proxy's tree is."""
        root, pids = self.proxy.proc.pid, self.proxy_pids()
        roles = {str(pid): probe.role(pid, root) for pid in pids}
        if len(pids) > 1:
            roles[str(root)] = "supervisor"  # serve --workers N: discovery, no serving
        return roles

    @staticmethod
    def port(sim: SimProcess) -> int:
        return int(sim.http_address.rpartition(":")[2])

    def sockets(self) -> list[probe.Sockets]:
        return probe.sockets(
            self.proxy_pids(),
            self.proxy.http_port,
            {self.port(s) for s in self.decodes},
            {self.port(s) for s in self.prefills},
        )

    def dead(self) -> list[str]:
        """Logs of the processes that exited, with their tails."""
        procs = [(self.proxy.proc, self.proxy.log)] + [(s.proc, s.log) for s in self.sims]
        return [
            f"{log.name} exited with {proc.returncode}:\n{log_tail(log, 8)}"
            for proc, log in procs
            if proc.poll() is not None
        ]

    def stats(self, sim: SimProcess) -> dict[str, Any]:
        """The instance's ``GET /sim/stats`` (``{"unreadable": why}`` if it does not answer)."""
        try:
            return dict(_call(_control(sim) + "/sim/stats"))
        except (OSError, ValueError) as exc:
            return {"unreadable": str(exc)}

    def in_flight(self, sims: Sequence[SimProcess]) -> int:
        """Generation requests the instances still serve (-1 if one does not answer)."""
        total = 0
        for sim in sims:
            count = self.stats(sim).get("in_flight")
            if not isinstance(count, int):
                return -1
            total += count
        return total

    def set_faults(self, sims: Sequence[SimProcess], faults: dict[str, Any]) -> None:
        """Replace the faults of ``sims`` (``{}`` clears them)."""
        for sim in sims:
            _call(_control(sim) + "/sim/faults", json.dumps(faults).encode())

    def stop(self) -> None:
        stop(self.proxy.proc)
        for sim in self.sims:
            stop(sim.proc)


def _control(sim: SimProcess) -> str:
    if sim.control_url is None:
        raise RuntimeError(f"{sim.url} was started without a control port")
    return sim.control_url


def _call(url: str, data: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def start(
    logs: Path,
    name: str,
    *,
    mode: str,
    proxy_args: Sequence[str],
    prefills: int,
    decodes: int,
    decode_args: Sequence[str] = (),
    launcher: Sequence[str] = ("-m", "moriio_proxy"),
) -> Deployment:
    """The proxy, then its simulators; returns once every worker can route to all of them."""
    proxy = start_proxy(logs / f"{name}-proxy.log", proxy_args, launcher=launcher)
    sims: list[SimProcess] = []
    try:
        for role, count, extra in (("P", prefills, ()), ("D", decodes, decode_args)):
            for i in range(count):
                log = logs / f"{name}-sim-{role}{i}.log"
                args = ["--control-port", "0", *extra]
                sims.append(start_sim(role, mode, log, proxy.discovery, args))
        deployment = Deployment(proxy, sims[:prefills], sims[prefills:])
        _wait_routable(deployment, prefills, decodes)
    except BaseException:
        stop(proxy.proc)
        for sim in sims:
            stop(sim.proc)
        raise
    return deployment


def _wait_routable(
    deployment: Deployment, prefills: int, decodes: int, timeout: float = 60.0
) -> None:
    """Until ``/admin/instances`` lists every simulator as healthy several times in a row.

    Under ``--workers N`` each request lands on one worker at random, so several answers in
    a row make it likely every worker has been fed the supervisor's registry; the workers'
    snapshot interval is half a second, so a pause of two seconds after covers the rest.
    """
    url = deployment.proxy.url + "/admin/instances"
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 8:
        dead = deployment.dead()
        if dead:
            raise StartError("\n".join(dead))
        if time.monotonic() > deadline:
            raise StartError(f"the proxy did not list every simulator within {timeout:g} s")
        try:
            view = _call(url)
        except (OSError, ValueError):
            view = {}
        healthy = [i["role"] for i in view.get("instances", []) if i.get("state") == "healthy"]
        ok = healthy.count("P") == prefills and healthy.count("D") == decodes
        in_a_row = in_a_row + 1 if ok else 0
        time.sleep(0.1 if ok else 0.3)
    time.sleep(2.0)
