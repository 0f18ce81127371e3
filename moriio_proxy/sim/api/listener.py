"""The HTTP listening socket of a simulated instance, which can close and re-open.

Two things close it: ``SimFaults.refuse_connections`` (an instance that heartbeats but
cannot be reached; turning the fault off re-binds the same port, so the registered
``http_address`` stays right) and engine death (vLLM's API server exits). Keep-alive
connections would still reach a closed listener, so they are closed too: idle ones at once,
busy ones once their in-flight request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The listen() backlog: aiohttp's default (128) makes the kernel drop SYNs past the 129th
# connection that arrives while the event loop is busy, which a benchmark opening thousands
# of streams at once does; the clients then wait for SYN retransmits (1 s, 3 s, ...). The
# proxy's server uses the same figure; the kernel caps it at net.core.somaxconn.
BACKLOG = 2048


def bound_port(site: web.TCPSite, port: int) -> int:
    """The port a site listens on (the one the OS picked when ``port`` is 0)."""
    server = site._server
    if port == 0 and server is not None:
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1])
    return port


class HttpListener:
    """An aiohttp runner whose TCP site comes and goes."""

    def __init__(
        self,
        host: str,
        port: int,
        tag: str,
        live: Callable[[], bool],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``live()`` False (stopping, engine dead) freezes the listener as it is;
        ``ssl_context`` serves HTTPS."""
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self._tag = tag
        self._live = live
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._cleaned = False
        self._busy: dict[Any, int] = {}  # HTTP connection -> requests in progress on it
        self._rebind_error: str | None = None  # why re-binding the port last failed
        self.refusing = False  # closed by refuse_connections

    @property
    def port(self) -> int:
        return self._port

    async def start(self, app: web.Application) -> None:
        """Serve ``app`` (built with ``middleware``) on host:port."""
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._site = self._new_site()
        await self._site.start()
        self._port = bound_port(self._site, self._port)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Track busy connections; drop a request that slipped in while refusing."""
        conn = request.protocol
        if self.refusing:
            # A keep-alive connection accepted before the listener closed: behave like an
            # unreachable server (no response).
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        self._busy[conn] = self._busy.get(conn, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy.get(conn, 1) - 1
            if left > 0:
                self._busy[conn] = left
            else:
                self._busy.pop(conn, None)

    async def refuse(self, refuse: bool, on_refused: Callable[[], None]) -> None:
        """Close (``refuse``) or re-open the listening socket; no-op once frozen."""
        async with self._lock:
            if not self._live() or self._runner is None or self._cleaned:
                return
            if refuse and not self.refusing:
                self.refusing = True
                await self._stop_site()
                server = self._runner.server
                for conn in server.connections if server is not None else []:
                    if conn in self._busy:
                        conn.close()
                    else:
                        conn.force_close()
                on_refused()
                logger.warning(
                    "%s fault: refusing HTTP connections on port %d (heartbeats continue)",
                    self._tag,
                    self._port,
                )
            elif not refuse and self.refusing:
                site = self._new_site()
                try:
                    await site.start()
                except OSError as e:
                    with contextlib.suppress(Exception):
                        await site.stop()
                    if self._rebind_error != str(e):
                        self._rebind_error = str(e)
                        logger.error(
                            "%s cannot re-bind HTTP port %d (retrying): %s",
                            self._tag,
                            self._port,
                            e,
                        )
                    return
                self._site = site
                self.refusing = False
                self._rebind_error = None
                logger.warning("%s fault cleared: accepting HTTP connections again", self._tag)

    def _new_site(self) -> web.TCPSite:
        assert self._runner is not None
        return web.TCPSite(
            self._runner, self._host, self._port, backlog=BACKLOG, ssl_context=self._ssl
        )

    async def close_socket(self) -> None:
        """No new connections ("connection refused"); in-flight requests carry on."""
        async with self._lock:
            await self._stop_site()

    async def _stop_site(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            with contextlib.suppress(Exception):
                await site.stop()

    async def cleanup(self) -> None:
        """Drop every connection like a process exit would (idempotent)."""
        if self._runner is not None and not self._cleaned:
            self._cleaned = True
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
