"""What a started ``moriio-proxy`` process says about itself, for the code that starts one.

The test suite and bench/ run ``serve --port 0 --discovery-port 0`` and ``sim --port 0``:
each process binds whatever port the kernel gives it and announces it in one line. Reading
that line back is race-free, unlike choosing a "free" port first and passing it on (another
process may take it in between). Both read the lines with the patterns below, so a change
to a line is made in one place; tests/unit/test_testing.py feeds the real lines through them.

Nothing in the proxy imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "moriio-proxy 0.1.0 serving OpenAI on http[s]://HOST:PORT[ with N workers] (discovery: ...)",
# where discovery is "tcp://HOST:PORT" or, with Kubernetes discovery, "pods ...".
_SERVING = re.compile(
    r"serving OpenAI on (?P<scheme>https?)://(?P<host>\S+?):(?P<port>\d+)"
    r"(?: with (?P<workers>\d+) workers)?"
    r" \(discovery: (?:tcp://\S+?:(?P<discovery_port>\d+)|pods .*)\)"
)
# "moriio-proxy sim: role=P mode=READ url=... http_address=... zmq_address=...[ control=...]"
_SIM = re.compile(
    r"moriio-proxy sim: role=(?P<role>[PD]) mode=(?P<mode>\w+) "
    r"(?:vllm=(?P<vllm_version>\S+) )?url=(?P<url>\S+) "
    r"http_address=(?P<http_address>\S+) zmq_address=(?P<zmq_address>\S+)"
    r"(?: control=(?P<control_url>\S+))?"
)


@dataclass(frozen=True)
class Serving:
    """The addresses ``moriio-proxy serve`` announced once it was ready for requests."""

    host: str
    port: int
    workers: int
    discovery_port: int | None  # None with Kubernetes discovery: it listens on nothing
    scheme: str = "http"  # https with --certfile

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class SimStarted:
    """The addresses ``moriio-proxy sim`` announced once it was serving."""

    role: str
    mode: str
    url: str
    http_address: str
    zmq_address: str
    control_url: str | None
    vllm_version: str | None = None  # the release it behaves as (absent before 0.33 support)


def parse_serving(text: str) -> Serving | None:
    """The first serving announcement in ``text`` (a line or a whole log), or None."""
    found = _SERVING.search(text)
    if found is None:
        return None
    discovery = found["discovery_port"]
    return Serving(
        host=found["host"],
        port=int(found["port"]),
        workers=int(found["workers"] or 1),
        discovery_port=int(discovery) if discovery is not None else None,
        scheme=found["scheme"],
    )


def parse_sim_started(text: str) -> SimStarted | None:
    """The first simulator announcement in ``text`` (a line or a whole log), or None."""
    found = _SIM.search(text)
    if found is None:
        return None
    return SimStarted(
        role=found["role"],
        mode=found["mode"],
        url=found["url"],
        http_address=found["http_address"],
        zmq_address=found["zmq_address"],
        control_url=found["control_url"],
        vllm_version=found["vllm_version"],
    )
