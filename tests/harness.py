"""In-process proxy and simulated instances on real loopback sockets (tests and bench)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from moriio_proxy.app import ProxyState, create_app, state
from moriio_proxy.config import load_config
from moriio_proxy.server import bind_listener, serve
from moriio_proxy.sim import SimConfig, SimInstance


def free_port(low: int = 21000) -> int:
    """A free loopback port from ``low`` up, below the ephemeral range (the port trap)."""
    for port in range(low, 32000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32000")


@dataclass
class RunningProxy:
    url: str
    discovery: str  # "127.0.0.1:PORT" for SimConfig.proxy
    state: ProxyState
    sims: list[SimInstance] = field(default_factory=list)

    async def add_sim(self, role: str, **kwargs: Any) -> SimInstance:
        kwargs.setdefault("heartbeat_interval", 0.2)
        sim = SimInstance(SimConfig(role=role, proxy=self.discovery, **kwargs))
        await sim.start()
        self.sims.append(sim)
        return sim

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)

    async def wait_registered(self, n_prefill: int, n_decode: int) -> None:
        """Until the registry holds exactly these, and knows every simulated instance's
        vLLM version (pairing depends on it; static instances may never answer)."""
        registry = self.state.registry
        await self.wait_for(
            lambda: (
                len(registry.healthy("P")) == n_prefill
                and len(registry.healthy("D")) == n_decode
                and all(e.vllm_version is not None for e in registry.entries() if not e.static)
            )
        )


@contextlib.asynccontextmanager
async def running_proxy(**overrides: Any) -> AsyncIterator[RunningProxy]:
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
    config = load_config({k: v for k, v in settings.items()}, env={})
    if statics:
        from dataclasses import replace

        config = replace(config, static_instances=tuple(statics))
    sock = bind_listener(config.host, 0)
    app = create_app(config)
    proxy_state = state(app)
    await proxy_state.start()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, sock, stop.wait, graceful_timeout=1.0))
    port = sock.getsockname()[1]
    running = RunningProxy(
        url=f"http://127.0.0.1:{port}",
        discovery=f"127.0.0.1:{getattr(proxy_state.discovery, 'bound_port', None)}",
        state=proxy_state,
    )
    try:
        await _wait_listening(running.url)
        yield running
    finally:
        for sim in running.sims:
            await sim.stop()
        stop.set()
        await task
        await proxy_state.stop()
        sock.close()


async def _wait_listening(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"proxy at {url} never answered /health")


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The parsed ``data:`` payloads of an SSE response; ``[DONE]`` as the string."""
    import json

    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
