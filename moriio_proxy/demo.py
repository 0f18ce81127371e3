"""``moriio-proxy demo``: the proxy and one simulated prefill and decode instance on
127.0.0.1, for a first look without GPUs or vLLM (the README's first command)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from .cli import run_proxy, stop_event
from .config import load_config
from .sim import SimConfig, SimInstance
from .state import ProxyState

log = logging.getLogger("moriio_proxy")

# Seconds the demo gives its two simulated instances to register (they do in milliseconds).
READY_TIMEOUT = 30.0


async def run_demo(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM; 0 then, 1 if the instances never registered."""
    stop = stop_event()
    config = load_config(
        {
            "host": "127.0.0.1",
            "port": args.port,
            "discovery_host": "127.0.0.1",
            "discovery_port": args.discovery_port,
        },
        env={},
    )
    serving: asyncio.Future[ProxyState] = asyncio.get_running_loop().create_future()
    proxy_task = asyncio.create_task(run_proxy(config, stop, on_serving=serving.set_result))
    stopped = asyncio.ensure_future(stop.wait())
    sims: list[Any] = []
    try:
        # The simulated instances start once the discovery port is bound, and the banner
        # comes once both registered: its curl line works the moment it is printed.
        first: set[asyncio.Future[Any]] = {proxy_task, serving, stopped}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            stop.set()
            return await proxy_task
        for role in ("P", "D"):
            sim = SimInstance(
                SimConfig(
                    role=role,
                    proxy=f"127.0.0.1:{args.discovery_port}",
                    mode=args.mode,
                    token_latency=args.token_latency,
                    heartbeat_interval=1.0,
                )
            )
            await sim.start()
            sims.append(sim)
        ready = asyncio.ensure_future(_until_ready(serving.result()))
        await asyncio.wait(
            {proxy_task, ready, stopped},
            timeout=READY_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if ready.done():
            print(_banner(args.port, args.mode, sims), flush=True)
            await asyncio.wait({proxy_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        else:
            ready.cancel()
            if not stopped.done() and not proxy_task.done():
                log.error(
                    "the simulated instances did not register within %gs: %s",
                    READY_TIMEOUT,
                    serving.result().not_ready(),
                )
                stop.set()
                await proxy_task
                return 1
        stop.set()
        return await proxy_task
    finally:
        stopped.cancel()
        for sim in sims:
            await sim.stop()
        stop.set()


async def _until_ready(proxy: ProxyState) -> None:
    """Until the proxy could serve a request: woken by each registration, no polling."""
    registered = asyncio.Event()

    def wake(*_: Any, **__: Any) -> None:
        registered.set()

    proxy.registry.instance_added.connect(wake, sender=proxy.registry, weak=False)
    try:
        while proxy.not_ready() is not None:
            registered.clear()
            await registered.wait()
    finally:
        proxy.registry.instance_added.disconnect(wake, sender=proxy.registry)


def _banner(port: int, mode: str, sims: Sequence[Any]) -> str:
    url = f"http://127.0.0.1:{port}"
    lines = [
        f"moriio-proxy demo ({mode} mode) is up: proxy {url}",
        *(f"  simulated {s.config.role}: {s.url}  kv {s.zmq_address}" for s in sims),
        "",
        "Try it (Ctrl-C stops the demo):",
        f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' \\",
        '    -d \'{"model": "sim-model", "prompt": "The capital of France is", "max_tokens": 8}\'',
        f"  curl -s {url}/admin/instances",
    ]
    return "\n".join(lines)
