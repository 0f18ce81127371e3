"""``python -m bench.streams.traced SNAPSHOT_DIR serve ...``: the proxy under tracemalloc.

Where a stream's memory goes is read from Python's own allocation traces: this wrapper
starts tracemalloc before the proxy imports anything, then runs ``moriio-proxy`` with the
remaining arguments. Each SIGUSR2 writes a snapshot to SNAPSHOT_DIR (``<n>.tracemalloc``,
numbered from 1); the benchmark compares two of them. tracemalloc costs memory and CPU of
its own, so the RSS of a traced proxy is not a figure of record, only the attribution is.
Only the process started is traced (``serve --workers 1``).
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 12  # deep enough to reach the proxy's own frame under aiohttp/Hypercorn/asyncio


def main() -> int:
    where = Path(sys.argv[1])
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        path = where / f"{taken}.tracemalloc"
        tracemalloc.take_snapshot().dump(str(path.with_suffix(".part")))
        path.with_suffix(".part").rename(path)  # appears whole or not at all

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, dump)
    from moriio_proxy.cli import main as proxy_main

    return proxy_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
