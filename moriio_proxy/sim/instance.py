"""SimInstance: one simulated ``vllm serve`` process with the MoRI-IO connector, composed of
its transport, engine, OpenAI server, fault injector and heartbeat; and ``run_sim``, the
``moriio-proxy sim`` command's main loop.

Everything lives on the instance objects (no module state), so several instances run in
one event loop, as the tests and ``moriio-proxy demo`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import asdict
from typing import Any

from .api.control import ControlRoutes, ControlServer
from .api.exchange import Ledger
from .api.listener import HttpListener
from .api.server import OpenAIServer
from .engine.core import EngineCore
from .engine.request import SHUTTING_DOWN
from .faults import FaultInjector
from .heartbeat import heartbeat_loop, registration
from .settings import LegRecord, SimConfig, SimFaults, SimStats
from .transport import Transport, is_ipv6

logger = logging.getLogger(__name__)


class SimInstance:
    """One simulated ``vllm serve`` process with MoRIIOConnector (all DP ranks of it)."""

    def __init__(self, config: SimConfig) -> None:
        config.validate()
        tag = f"sim[{config.role}/{config.mode}/{config.vllm_version}]"
        self.config = config
        self.stats = SimStats()
        #: False: skip heartbeats (the proxy then ejects the instance) while serving on.
        self.heartbeating = True
        self._tag = tag
        self._injector = FaultInjector(config.faults, config.seed, tag)
        self._transport = Transport(config, tag)
        self._engine = EngineCore(config, self.stats, self._transport, tag, self._on_death)
        self._ledger = Ledger(config, self.stats, tag)
        self._listener = HttpListener(
            config.host, config.port, tag, self._live, _server_ssl(config)
        )
        self._server = OpenAIServer(config, self._engine, self._injector, self._ledger)
        self._control_routes = ControlRoutes(self._injector, self.stats_dict, self._sync_listener)
        self._control: ControlServer | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._death_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    @property
    def port(self) -> int:
        """The HTTP port actually bound."""
        return self._listener.port

    @property
    def url(self) -> str:
        """Base URL of the OpenAI server, e.g. ``http://127.0.0.1:PORT``."""
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self._url_host}:{self.port}"

    @property
    def control_port(self) -> int | None:
        """The bound control port (``SimConfig.control_port``), or None when not configured."""
        return self._control.port if self._control is not None else None

    @property
    def control_url(self) -> str | None:
        """Base URL of the always-on control listener (``/sim/*``), or None."""
        port = self.control_port
        return None if port is None else f"http://{self._url_host}:{port}"

    @property
    def _url_host(self) -> str:
        host = self.config.host
        return f"[{host}]" if is_ipv6(host) else host

    @property
    def http_address(self) -> str:
        """``IP:PORT`` as vLLM advertises it (an IPv6 host is NOT bracketed)."""
        return f"{self.config.host}:{self.port}"

    @property
    def zmq_address(self) -> str:
        """``host:IP,handshake:BASE,notify:BASE`` (rank 0's ports are the bases)."""
        return self._transport.advertised.zmq_address

    @property
    def handshake_base(self) -> int:
        return self._transport.handshake_base

    @property
    def notify_base(self) -> int:
        return self._transport.notify_base

    def registration(self) -> dict[str, Any]:
        """The exact heartbeat map vLLM sends (the same in 0.32 and 0.33)."""
        cfg = self.config
        return registration(
            cfg.role, cfg.mode, self.http_address, self.zmq_address, cfg.dp_size, cfg.tp_size
        )

    @property
    def legs(self) -> list[LegRecord]:
        """Every generation request as the engine saw it, oldest first (bounded)."""
        return self._ledger.legs

    @property
    def dead_reason(self) -> str | None:
        """Why EngineCore died, or None while it lives. Setting it marks the engine dead for
        ``/health`` and new requests without the rest of a death."""
        return self._engine.dead_reason

    @dead_reason.setter
    def dead_reason(self, reason: str | None) -> None:
        self._engine.dead_reason = reason

    @property
    def faults(self) -> SimFaults:
        """The live faults. Assign a new SimFaults (validated) or mutate its fields."""
        return self._injector.faults

    @faults.setter
    def faults(self, value: SimFaults) -> None:
        self._injector.faults = value

    async def set_faults(self, faults: SimFaults | None = None, **changes: Any) -> SimFaults:
        """Replace the faults (``faults``) and/or change fields (``changes``), then wait
        until the HTTP listener matches ``refuse_connections``. Returns the live faults."""
        self.faults = self._injector.changed(faults, **changes)
        await self._sync_listener()
        return self.faults

    @property
    def refusing(self) -> bool:
        """True while the HTTP listener is closed by ``SimFaults.refuse_connections``."""
        return self._listener.refusing

    def held_transfers(self) -> int:
        """KV registrations P still holds (blocks not yet read/written/released/reaped)."""
        return self._engine.held_transfers()

    def pending_kv_waiters(self) -> int:
        """D, WRITE: decode requests currently waiting for a KV write."""
        return self._engine.pending_kv_waiters()

    def stats_dict(self) -> dict[str, Any]:
        """SimStats as JSON-ready data plus engine state (what ``GET /sim/stats`` returns)."""
        out = asdict(self.stats)
        out["per_rank"] = {str(k): v for k, v in self.stats.per_rank.items()}
        out.update(
            dead_reason=self.dead_reason,
            held_transfers=self.held_transfers(),
            pending_kv_waiters=self.pending_kv_waiters(),
            prefix_cache_blocks=self._engine.cached_blocks(),
            in_flight=len(self._engine.streams),
            refusing=self.refusing,
            heartbeating=self.heartbeating,
            legs=len(self.legs),
        )
        return out

    async def wait_dead(self) -> str:
        """Wait until the simulated engine dies; returns the reason."""
        return await self._engine.wait_dead()

    async def __aenter__(self) -> SimInstance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind ZMQ (notify + handshake per DP rank) and HTTP, start the heartbeat."""
        if self._started:
            return
        self._started = True
        cfg = self.config
        if cfg.dp_size > 1 and cfg.tp_size > 1:
            logger.warning(
                "%s dp_size>1 with tp_size>1: real vLLM 0.32 binds base+dp_rank+tp_rank, "
                "so these ports collide; the sim binds tp_rank 0 only",
                self._tag,
            )
        try:
            self._transport.bind()
            app = self._server.app([self._listener.middleware])
            self._control_routes.add_to(app)
            await self._listener.start(app)
            if cfg.control_port is not None:
                self._control = ControlServer(self._control_routes)
                await self._control.start(cfg.host, cfg.control_port)
            await self._sync_listener()  # refuse_connections from the start
        except BaseException:
            await self._close_all()
            raise
        self._transport.serve(self._engine.on_notify)
        self._watch_task = asyncio.ensure_future(self._injector.watch(self._sync_listener))
        if cfg.proxy:
            self._heartbeat_task = asyncio.ensure_future(
                heartbeat_loop(
                    self._transport.context, cfg.proxy, cfg, self._heartbeat_message, self._tag
                )
            )
        logger.info(
            "%s started url=%s zmq_address=%s dp=%d tp=%d",
            self._tag,
            self.url,
            self.zmq_address,
            cfg.dp_size,
            cfg.tp_size,
        )

    async def stop(self) -> None:
        """Idempotent: answer in-flight requests, cancel tasks, close HTTP and ZMQ."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            return
        self._engine.broadcast(SHUTTING_DOWN)
        if self._death_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._death_task
        await self._close_all()
        logger.info("%s stopped", self._tag)

    def _live(self) -> bool:
        """Neither stopping nor dead: the listener may still change (refuse_connections)."""
        return not self._stopped and self._engine.dead_reason is None

    def _heartbeat_message(self) -> dict[str, Any] | None:
        if self.heartbeating and self.dead_reason is None:
            return self.registration()
        return None

    async def _sync_listener(self) -> None:
        """Close or re-open the HTTP listening socket to match ``faults.refuse_connections``."""
        await self._listener.refuse(
            bool(self._injector.faults.refuse_connections),
            lambda: self._ledger.fault(None, "refuse_connections"),
        )

    async def _close_all(self) -> None:
        own = [t for t in (self._heartbeat_task, self._watch_task) if t is not None]
        for t in own:
            t.cancel()
        await self._engine.stop()
        await self._transport.stop_serving()
        await asyncio.gather(*own, return_exceptions=True)
        await self._listener.cleanup()
        if self._control is not None:
            await self._control.cleanup()
        self._transport.close()

    def _on_death(self) -> None:
        self._death_task = asyncio.ensure_future(self._after_death())

    async def _after_death(self) -> None:
        """Go silent like an exited process: no heartbeats, no new connections, then (once
        in-flight handlers wrote their 500s) every connection dropped, keep-alive included."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        await self._listener.close_socket()
        await self._transport.stop_serving()
        for _ in range(100):
            if not self._engine.streams:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await self._listener.cleanup()


async def run_sim(config: SimConfig) -> int:
    """Run one simulated instance until SIGINT/SIGTERM (exit 0) or engine death (exit 1)."""
    inst = SimInstance(config)
    await inst.start()
    control = f" control={inst.control_url}" if inst.control_url else ""
    print(
        f"moriio-proxy sim: role={config.role} mode={config.mode} "
        f"vllm={config.vllm_version} url={inst.url} "
        f"http_address={inst.http_address} zmq_address={inst.zmq_address}{control}",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop_event = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    waiters = [
        asyncio.ensure_future(stop_event.wait()),
        asyncio.ensure_future(inst.wait_dead()),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await inst.stop()
    if inst.dead_reason is not None:
        print(f"moriio-proxy sim: engine died: {inst.dead_reason}", flush=True)
        return 1
    return 0


def _server_ssl(config: SimConfig) -> ssl.SSLContext | None:
    if not config.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    return context
