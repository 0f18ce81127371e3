"""Where the held streams' memory is, from two tracemalloc snapshots of a traced proxy.

The proxy runs under ``bench.streams.traced``; a snapshot is taken before the streams are
opened and one while they are held, and the difference is grouped by allocation site (the
innermost frame) and by the proxy's own frame that led to it (the first ``moriio_proxy``
frame of the traceback), so a line of the table reads "this much per stream was allocated
by aiohttp's X, on behalf of the proxy's Y".
"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

_SHORTEN = ("site-packages/", "lib/python3.11/", "/work/")
_PACKAGES = ("moriio_proxy", "aiohttp", "hypercorn", "h11", "asyncio", "contextlib", "quart")


def take(pid: int, where: Path, number: int, timeout: float = 120.0) -> Path:
    """Ask the traced proxy for snapshot ``number`` and wait until it is written."""
    path = where / f"{number}.tracemalloc"
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the traced proxy wrote no {path.name} in {timeout:g} s")
        time.sleep(0.2)
    return path


def _short(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    own = name.rfind("/moriio_proxy/")
    if own >= 0:
        return f"{name[own + 1 :]}:{frame.lineno}"
    for marker in _SHORTEN:
        at = name.rfind(marker)
        if at >= 0:
            name = name[at + len(marker) :]
            break
    return f"{name}:{frame.lineno}"


def _owner(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame of the proxy's own code in ``traceback`` (most recent last);
    "-" for work the event loop runs outside any of it (only cli.py's loop start is
    above: Hypercorn's connection handling, aiohttp's protocol callbacks)."""
    for frame in reversed(traceback):
        if "moriio_proxy" in frame.filename and not frame.filename.endswith("cli.py"):
            return _short(frame)
    return "-"


def _package(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for package in _PACKAGES:
        if f"/{package}/" in name or name.endswith(f"/{package}.py"):
            return package
    return "other"


def _load(path: Path) -> tracemalloc.Snapshot:
    return tracemalloc.Snapshot.load(str(path)).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def _traced(snapshot: tracemalloc.Snapshot) -> int:
    return sum(stat.size for stat in snapshot.statistics("filename"))


def attribute(before: Path, held: Path, after: Path, streams: int, top: int = 20) -> dict[str, Any]:
    """The allocations ``held`` has beyond ``before``, grouped, per stream; and what
    ``after`` (all streams closed) still has beyond ``before``."""
    old, new = _load(before), _load(held)
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    packages: dict[str, int] = defaultdict(int)
    total = 0
    for stat in new.compare_to(old, "traceback"):
        key = (_short(stat.traceback[-1]), _owner(stat.traceback))
        sizes[key] += stat.size_diff
        counts[key] += stat.count_diff
        packages[_package(stat.traceback[-1])] += stat.size_diff
        total += stat.size_diff
    rows = sorted(sizes, key=lambda k: sizes[k], reverse=True)[:top]
    return {
        "streams": streams,
        "traced_bytes_per_stream": round(total / streams),
        "traced_bytes_per_stream_after_close": round(
            (_traced(_load(after)) - _traced(old)) / streams
        ),
        "by_package": {
            name: round(size / streams)
            for name, size in sorted(packages.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {
                "site": site,
                "proxy_frame": owner,
                "bytes_per_stream": round(sizes[(site, owner)] / streams),
                "blocks_per_stream": round(counts[(site, owner)] / streams, 2),
            }
            for site, owner in rows
        ],
    }
