"""Where a stream's wait went, from outside: the proxy's own metrics and the accept queues.

The client sees only the time to its first token. The proxy's histograms split it (the
prefill leg; the first byte sent back) and its counters say what failed upstream; the
listening sockets' accept queues (``ss``) say whether connections waited for a process
to accept them, the proxy's or a simulator's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Collection

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")
_LE = re.compile(r'le="([^"]+)"')
HISTOGRAMS = ("moriio_proxy_prefill_duration_seconds", "moriio_proxy_time_to_first_token_seconds")
COUNTERS = (
    "moriio_proxy_upstream_errors_total",
    "moriio_proxy_retries_total",
    "moriio_proxy_ejections_total",
)


def metrics(url: str) -> dict[str, float]:
    """Every sample of the proxy's ``/metrics``, keyed by name and labels as written."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found:
            out[found[1] + (found[2] or "")] = float(found[3])
    return out


def _buckets(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """The histogram's cumulative buckets summed over its label sets (endpoint, mode,
    outcome), by upper bound."""
    rows: dict[float, float] = {}
    for key, value in samples.items():
        if key.startswith(name + "_bucket"):
            le = _LE.search(key)
            if le:
                rows[float(le[1])] = rows.get(float(le[1]), 0.0) + value
    return sorted(rows.items())


def quantiles(
    before: dict[str, float], after: dict[str, float], name: str, qs: Collection[float]
) -> dict[str, str]:
    """Quantiles of the observations made between two scrapes, as bucket bounds
    ("<= 2.5", or "> 300" past the last finite bucket)."""
    old = dict(_buckets(before, name))
    rows = [(le, count - old.get(le, 0.0)) for le, count in _buckets(after, name)]
    total = rows[-1][1] if rows else 0.0
    out: dict[str, str] = {"count": f"{total:.0f}"}
    for q in qs:
        previous = 0.0
        for le, count in rows:
            if total and count >= q * total:
                out[f"p{q * 100:g}"] = f"<= {le:g}" if le != float("inf") else f"> {previous:g}"
                break
            previous = le
    return out


def counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counters of COUNTERS that moved between two scrapes, by name and labels."""
    return {
        key: value - before.get(key, 0.0)
        for key, value in after.items()
        if key.startswith(COUNTERS) and value != before.get(key, 0.0)
    }


def accept_queues(ports: Collection[int]) -> dict[int, tuple[int, int]]:
    """port -> (connections waiting to be accepted, backlog), summed over the listeners
    of each port (``serve --workers N`` has one per worker); {} without ``ss``."""
    if shutil.which("ss") is None:
        return {}
    try:
        text = subprocess.run(
            ["ss", "-Hltn"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[3].rpartition(":")[2].isdigit():
            continue
        port = int(parts[3].rpartition(":")[2])
        if port in ports:
            queued, backlog = out.get(port, (0, 0))
            out[port] = (queued + int(parts[1]), backlog + int(parts[2]))
    return out
