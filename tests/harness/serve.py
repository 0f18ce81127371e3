"""``moriio-proxy serve`` as a real process, on the ports it binds itself.

It is started with ``--port 0 --discovery-port 0`` and its ports are read from the line it
logs once it serves (moriio_proxy/testing.py), so no port is chosen for it in advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from moriio_proxy.compat import timeout_after
from moriio_proxy.sim import SimInstance
from moriio_proxy.testing import Serving, parse_serving

from .proxy import start_sim
from .waiting import eventually

ROOT = Path(__file__).resolve().parents[2]

# Startup imports the whole proxy (and, with workers, spawns and imports it N more times):
# seconds on an idle machine, far more on a loaded one.
START_TIMEOUT = 90.0
# SIGTERM drains in-flight streams (drain_timeout) before the process exits.
STOP_TIMEOUT = 60.0


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    serving: Serving
    log: list[bytes] = field(default_factory=list)  # stderr, line by line, as it arrives
    sims: list[SimInstance] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.serving.url

    @property
    def discovery(self) -> str:
        """``127.0.0.1:PORT``, what SimConfig.proxy takes."""
        return f"127.0.0.1:{self.serving.discovery_port}"

    def log_text(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    async def wait_ready(self, times: int = 1) -> None:
        """Until /ready answers 200 ``times`` in a row, each on a fresh connection (with
        ``--workers N`` the kernel hands each connection to any worker)."""

        async def ready() -> bool:
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(times):
                    try:
                        async with session.get(self.url + "/ready") as resp:
                            if resp.status != 200:
                                return False
                    except aiohttp.ClientError:  # a worker that is going away
                        return False
            return True

        await eventually(ready, interval=0.1, what=f"{self.url}/ready")

    async def add_sim(self, role: str, **settings: Any) -> SimInstance:
        """A simulated instance (in this process) registering with the proxy process."""
        sim = await start_sim(role, self.discovery, **settings)
        self.sims.append(sim)
        return sim


async def _pump(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while line := await stream.readline():
        sink.append(line)


@contextlib.asynccontextmanager
async def serve_process(*args: str) -> AsyncIterator[ServeProcess]:
    """``moriio-proxy serve ARGS`` on loopback, from its serving line until the block ends.

    On exit its simulated instances stop, then the process gets SIGTERM (the supervisor of
    ``--workers N`` stops its workers; killed, it could not) and, if it does not exit in
    time, SIGKILL.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moriio_proxy", "serve", "--host", "127.0.0.1", "--port", "0",
        "--discovery-host", "127.0.0.1", "--discovery-port", "0", *args,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[bytes] = []
    pump: asyncio.Task[None] | None = None
    running: ServeProcess | None = None
    try:
        async with timeout_after(START_TIMEOUT):
            while True:
                line = await proc.stderr.readline()
                assert line, "moriio-proxy serve exited before serving:\n" + b"".join(log).decode()
                log.append(line)
                if (serving := parse_serving(line.decode(errors="replace"))) is not None:
                    break
        pump = asyncio.ensure_future(_pump(proc.stderr, log))
        running = ServeProcess(proc, serving, log)
        yield running
    finally:
        for sim in running.sims if running else ():
            await sim.stop()
        if proc.returncode is None:
            proc.terminate()
            try:
                async with timeout_after(STOP_TIMEOUT):
                    await proc.wait()
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
