"""A proxy in this process on real loopback sockets, with simulated instances around it.

The proxy binds port 0 for HTTP and discovery and reports what it got; each simulated
instance binds its own ports and heartbeats to the proxy's discovery port, as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from moriio_proxy.app import create_app, state
from moriio_proxy.config import load_config
from moriio_proxy.security import server_tls
from moriio_proxy.server import bind_listener, serve
from moriio_proxy.sim import SimConfig, SimInstance
from moriio_proxy.state import ProxyState

from .waiting import STATE_TIMEOUT, eventually

# Heartbeats of simulated instances: often enough that registration is quick, with the
# proxies' instance TTL (2 s below) ten intervals away from an eviction.
HEARTBEAT_INTERVAL = 0.2


async def start_sim(role: str, discovery: str | None, **settings: Any) -> SimInstance:
    """A started simulated instance heartbeating to ``discovery`` ("HOST:PORT")."""
    settings.setdefault("heartbeat_interval", HEARTBEAT_INTERVAL)
    sim = SimInstance(SimConfig(role=role, proxy=discovery, **settings))
    await sim.start()
    return sim


@dataclass
class RunningProxy:
    url: str
    discovery: str  # 127.0.0.1:PORT, what SimConfig.proxy takes
    state: ProxyState
    sims: list[SimInstance] = field(default_factory=list)

    async def add_sim(self, role: str, **settings: Any) -> SimInstance:
        """A simulated instance registering with this proxy; stopped with the proxy."""
        sim = await start_sim(role, self.discovery, **settings)
        self.sims.append(sim)
        return sim

    async def wait_for(
        self, predicate: Callable[[], object], timeout: float = STATE_TIMEOUT
    ) -> None:
        """``eventually(predicate)``, kept as a method for the tests that call it so."""
        await eventually(predicate, timeout)

    async def wait_registered(self, n_prefill: int, n_decode: int) -> None:
        """Until the registry holds exactly these, and knows every simulated instance's
        vLLM version (pairing depends on it; static instances may never answer)."""
        registry = self.state.registry
        await eventually(
            lambda: (
                len(registry.healthy("P")) == n_prefill
                and len(registry.healthy("D")) == n_decode
                and all(e.vllm_version is not None for e in registry.entries() if not e.static)
            ),
            what=f"{n_prefill} prefill and {n_decode} decode instances registered",
        )


@contextlib.asynccontextmanager
async def running_proxy(
    *, clock: Callable[[], float] = time.monotonic, tracing: Any = None, **overrides: Any
) -> AsyncIterator[RunningProxy]:
    """A proxy configured by ``overrides`` (ProxyConfig fields) serving until the block ends.

    ``clock`` becomes the registry's (see tests/harness/clock.py); ``tracing`` a
    ``moriio_proxy.tracing.Tracing`` (a test's in-memory exporter). On exit the simulated
    instances stop first, then the proxy.
    """
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "discovery_host": "127.0.0.1",
        "discovery_port": 0,
        "instance_ttl": 2.0,
        "log_level": "debug",
    }
    settings.update(overrides)
    statics = settings.pop("static_instances", None)
    config = load_config(settings, env={})
    if statics:
        config = replace(config, static_instances=tuple(statics))
    sock = bind_listener(config.host, 0)
    app = create_app(config, clock=clock, tracing=tracing)
    proxy_state = state(app)
    await proxy_state.start()
    stop = asyncio.Event()

    async def stopped() -> None:
        await stop.wait()

    tls = server_tls(config)
    task = asyncio.create_task(
        serve(
            app,
            sock,
            stopped,
            graceful_timeout=1.0,
            tls=tls,
            max_header_bytes=config.max_header_bytes,
        )
    )
    running = RunningProxy(
        url=f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}",
        discovery=f"127.0.0.1:{proxy_state.discovery.bound_port}",
        state=proxy_state,
    )
    try:
        if tls is None:  # over TLS the caller's first request waits in the backlog instead
            await _wait_serving(running.url)
        yield running
    finally:
        for sim in running.sims:
            await sim.stop()
        stop.set()
        await task
        await proxy_state.stop()
        sock.close()


async def _wait_serving(url: str) -> None:
    """Until Hypercorn answers on the socket (it starts in the background)."""
    async with aiohttp.ClientSession() as session:

        async def answers() -> bool:
            try:
                async with session.get(url + "/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(answers, interval=0.02, what=f"an answer from the proxy at {url}")
