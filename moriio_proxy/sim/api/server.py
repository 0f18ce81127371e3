"""vLLM's OpenAI server as the proxy meets it: ``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/version``, ``/start_profile`` and
``/stop_profile``; ``id = "cmpl-" + X-Request-Id``.

A generation request is validated, may draw an injected fault, is split into engine
requests, and is answered as JSON or SSE from their token events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..connector import leg_kind
from ..engine.core import EngineCore
from ..engine.request import ENGINE_DEAD, EngineRequest
from ..faults import FaultInjector
from ..settings import LegRecord, SimConfig
from .errors import BadRequest, error_body, error_type
from .exchange import ConnectionCut, Exchange, Ledger, signal_error
from .responses import respond_json, respond_stream
from .validation import ResponseSpec, parse_request, split

logger = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024  # long prompts sent as token-id lists make large bodies


class OpenAIServer:
    """The route handlers of one instance's OpenAI server."""

    def __init__(
        self, config: SimConfig, engine: EngineCore, injector: FaultInjector, ledger: Ledger
    ) -> None:
        self._config = config
        self._engine = engine
        self._injector = injector
        self._ledger = ledger

    def app(self, middlewares: list[Middleware]) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY, middlewares=middlewares)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_post("/start_profile", self._start_profile)
        app.router.add_post("/stop_profile", self._stop_profile)
        return app

    async def _start_profile(self, request: web.Request) -> web.Response:
        return self._profile(running=True)

    async def _stop_profile(self, request: web.Request) -> web.Response:
        return self._profile(running=False)

    def _profile(self, running: bool) -> web.Response:
        """vLLM 0.32/0.33 mount these routes only with a profiler configured: otherwise
        FastAPI's 404. With one, an empty 200 once the engine started or stopped it."""
        if not self._config.profiler:
            return web.json_response({"detail": "Not Found"}, status=404)
        self._ledger.profiler(running)
        logger.info("%s profiler %s", self._ledger.tag, "started" if running else "stopped")
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        """The same route and shape in 0.32 and 0.33: the release, e.g. "0.33.0"."""
        return web.json_response({"version": f"{self._config.vllm_version}.0"})

    async def _models(self, request: web.Request) -> web.Response:
        cfg = self._config
        model = {
            "id": cfg.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": cfg.model,
            "parent": None,
            "max_model_len": cfg.max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self._engine.dead_reason is not None else 200)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rec = self._ledger.open(request)
        if self._engine.dead_reason is not None:
            status, body = signal_error(ENGINE_DEAD, self._engine.dead_reason)
            self._ledger.finish(rec, status)
            return web.json_response(body, status=status)
        try:
            spec, choices = await self._parse(request, chat, rec)
        except BadRequest as e:
            self._ledger.finish(rec, e.status)
            body = error_body(e.message, e.err_type, e.status, e.param)
            return web.json_response(body, status=e.status)
        fault = self._injector.draw()
        if fault is not None and fault.status is not None:
            return self._status_fault(rec, fault.status)
        queue = self._engine.open_stream()
        ex = Exchange(request, rec, spec, choices, queue, fault, self._ledger, self._engine)
        return await self._serve(ex)

    async def _parse(
        self, request: web.Request, chat: bool, rec: LegRecord
    ) -> tuple[ResponseSpec, list[EngineRequest]]:
        """Validate the body and split it into engine requests (recorded on the leg)."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"JSON decode error: {e}") from e
        rec.body = body if isinstance(body, dict) else None
        parsed = parse_request(body, chat, request.headers, self._config)
        choices = split(parsed, rec, self._engine.pick_rank)
        rec.dp_rank = choices[0].rank
        rec.request_id = choices[0].engine_id
        rec.kind = leg_kind(self._config.role, parsed.kv)
        if len(choices) > 1 and parsed.kv:
            logger.warning(
                "%s %d engine requests share one kv_transfer_params (multi-prompt or n>1): "
                "their transfers collide, as in vLLM 0.32",
                self._ledger.tag,
                len(choices),
            )
        return parsed.spec, choices

    async def _serve(self, ex: Exchange) -> web.StreamResponse:
        """Run the engine requests and answer; the queue is closed however this ends."""
        tasks: list[asyncio.Task[None]] = []
        try:
            fault = ex.fault
            if fault is not None and fault.stall_first_byte is not None:
                signal = await ex.stall_first_byte(fault.stall_first_byte)
                if signal is not None:
                    return ex.failure(signal)
            ex.rec.started = True
            tasks = [self._engine.submit(req, ex.queue) for req in ex.choices]
            if ex.spec.stream:
                return await respond_stream(ex)
            return await respond_json(ex)
        except ConnectionCut:
            ex.rec.finished_at = time.time()
            # End like a dropped connection: aiohttp writes nothing more.
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            ex.cancelled()
            raise
        finally:
            self._engine.close_stream(ex.queue)
            for t in tasks:
                t.cancel()

    def _status_fault(self, rec: LegRecord, status: int) -> web.Response:
        """SimFaults.status: vLLM's error JSON; the engine never sees the request."""
        self._ledger.fault(rec, "status")
        self._ledger.finish(rec, status)
        logger.info("%s fault: answering %s with HTTP %d", self._ledger.tag, rec.request_id, status)
        message = f"Simulated fault: the server answered HTTP {status} (SimFaults.status)."
        return web.json_response(error_body(message, error_type(status), status), status=status)
