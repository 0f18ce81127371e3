"""The ``/sim/*`` control routes: read and change the live faults, read the counters.

Served on the HTTP port and, with ``SimConfig.control_port``, on a port of their own that
``refuse_connections`` leaves open (so a test can turn the fault off again).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..faults import FaultInjector
from ..settings import SimFaults
from .errors import error_body
from .listener import bound_port


class ControlRoutes:
    """Handlers of ``GET|POST|PATCH /sim/faults`` and ``GET /sim/stats``."""

    def __init__(
        self,
        injector: FaultInjector,
        stats: Callable[[], dict[str, Any]],
        apply: Callable[[], Awaitable[None]],
    ) -> None:
        """``apply`` makes the listener match the faults before a change is answered."""
        self._injector = injector
        self._stats = stats
        self._apply = apply

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/sim/faults", self._get_faults)
        app.router.add_post("/sim/faults", self._set_faults)
        app.router.add_patch("/sim/faults", self._set_faults)
        app.router.add_get("/sim/stats", self._get_stats)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._injector.faults.to_dict())

    async def _set_faults(self, request: web.Request) -> web.Response:
        """POST replaces the faults (omitted fields take defaults; ``{}`` clears them all);
        PATCH changes only the fields given. 400 on unknown keys or bad values."""
        try:
            raw = await request.read()
            data = json.loads(raw) if raw.strip() else {}
            base = self._injector.faults if request.method == "PATCH" else None
            new = SimFaults.from_dict(data, base=base)
        except ValueError as e:
            return web.json_response(error_body(str(e), "BadRequestError", 400), status=400)
        self._injector.faults = new
        await self._apply()
        return web.json_response(self._injector.faults.to_dict())

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self._stats())


class ControlServer:
    """The control routes alone on ``SimConfig.control_port``."""

    def __init__(self, routes: ControlRoutes) -> None:
        self._routes = routes
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        self._routes.add_to(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = bound_port(site, port)

    async def cleanup(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
