"""The Quart app: OpenAI routes, health and admin endpoints, startup and shutdown.

``create_app(config)`` builds everything a request needs as objects owned by the app (no
module-level state), so tests build as many independent proxies as they like in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from .config import ProxyConfig
from .disagg import Disaggregator, JsonAnswer, ProxyError, client_id
from .discovery import DiscoverySource, make_discovery
from .metrics import CONTENT_TYPE, Metrics
from .policies import make_policy
from .protocol import (
    REQUEST_ID_HEADER,
    Endpoint,
    RequestError,
    error_body,
    parse_client_request,
)
from .registry import Entry, Registry
from .upstream import Timeouts, Upstream, UpstreamError

log = logging.getLogger("moriio_proxy")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_MODELS_TIMEOUT = 3.0


@dataclass
class ProxyState:
    """Everything the app owns; tests reach it through ``state(app)``."""

    config: ProxyConfig
    registry: Registry
    metrics: Metrics
    upstream: Upstream
    discovery: DiscoverySource
    disagg: Disaggregator
    draining: bool = False
    started: bool = False
    inflight: int = 0

    async def start(self) -> None:
        """Bind discovery first (the step that fails on a taken port), then the session.

        Idempotent, so the CLI can start early and report a taken port as one clean line
        before Hypercorn's own startup hook runs it again.
        """
        if self.started:
            return
        await self.discovery.start()
        await self.upstream.start()
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.discovery.stop()
        await self.disagg.close()
        await self.upstream.close()

    def drain(self) -> None:
        """Start a graceful shutdown: /ready turns 503 and new requests are refused."""
        if not self.draining:
            self.draining = True
            log.warning("draining: refusing new requests, %d in flight", self.inflight)


def state(app: Quart) -> ProxyState:
    return app.extensions["moriio_proxy"]


def create_app(config: ProxyConfig) -> Quart:
    app = Quart("moriio_proxy")
    # Streams last as long as generation does; our own timeouts bound every upstream wait.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    pinned = None if config.transfer_mode == "auto" else config.transfer_mode
    registry = Registry(
        config.instance_ttl,
        pinned_mode=pinned,  # type: ignore[arg-type]
        eject_after=config.eject_after,
        eject_seconds=config.eject_seconds,
    )
    metrics = Metrics()
    upstream = Upstream(
        Timeouts(
            connect=config.connect_timeout,
            prefill=config.prefill_timeout,
            first_byte=config.decode_first_byte_timeout,
            idle=config.stream_idle_timeout,
        )
    )
    discovery = make_discovery(config, registry, metrics)
    disagg = Disaggregator(
        registry,
        upstream,
        metrics,
        prefill_policy=make_policy(config.prefill_policy),
        decode_policy=make_policy(config.decode_policy),
        max_retries=config.max_retries,
        retry_backoff=config.retry_backoff,
        request_timeout=config.request_timeout,
    )
    proxy = ProxyState(config, registry, metrics, upstream, discovery, disagg)
    app.extensions["moriio_proxy"] = proxy
    _watch_registry(proxy)

    app.before_serving(proxy.start)
    app.after_serving(proxy.stop)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _serve(proxy, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await _serve(proxy, "chat")

    @app.get("/v1/models")
    async def models() -> Response:
        return await _models(proxy)

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        reason = _not_ready(proxy)
        if reason:
            return _json({"status": "not ready", "reason": reason}, 503)
        return _json({"status": "ready", "transfer_mode": registry.mode})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), 200, content_type=CONTENT_TYPE)

    @app.get("/admin/instances")
    async def admin_instances() -> Response:
        return _json(
            {
                "transfer_mode": registry.mode,
                "instances": [_describe(proxy, e) for e in registry.entries()],
            }
        )

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return _json(error_body(exc.description or exc.name, status), status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error while serving %s %s", request.method, request.path)
        return _json(error_body("internal proxy error; see the proxy's log", 500), 500)

    return app


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status, headers=headers, content_type="application/json")


async def _serve(proxy: ProxyState, endpoint: Endpoint) -> Response:
    started = time.monotonic()
    suffix = client_id(request.headers.get(REQUEST_ID_HEADER))
    headers = {REQUEST_ID_HEADER: suffix}
    metrics = proxy.metrics
    if proxy.draining:
        metrics.rejected.labels("draining").inc()
        return _json(error_body("the proxy is shutting down", 503), 503, headers)
    limit = proxy.config.max_inflight
    if limit and proxy.inflight >= limit:
        metrics.rejected.labels("over_capacity").inc()
        message = f"the proxy is at its limit of {limit} requests in flight; retry shortly"
        return _json(error_body(message, 429), 429, {**headers, "Retry-After": "1"})
    raw = await request.get_data(cache=False)
    try:
        parsed = parse_client_request(endpoint, json.loads(raw))
    except ValueError as exc:  # JSONDecodeError and RequestError are both ValueErrors
        metrics.requests.labels(endpoint, "bad_request").inc()
        if isinstance(exc, RequestError):
            return _json(error_body(exc.message, 400, param=exc.param), 400, headers)
        return _json(error_body(f"request body is not valid JSON: {exc}", 400), 400, headers)

    proxy.inflight += 1
    metrics.inflight.inc()
    finished = False

    def finish(outcome: str) -> None:
        nonlocal finished
        if not finished:
            finished = True
            proxy.inflight -= 1
            metrics.inflight.dec()
            metrics.requests.labels(endpoint, outcome).inc()
            metrics.request_seconds.labels(endpoint).observe(time.monotonic() - started)

    try:
        answer = await proxy.disagg.handle(parsed, suffix)
    except ProxyError as exc:
        finish("no_instances" if exc.status == 503 else f"error_{exc.status}")
        return _json(exc.body(), exc.status, {**headers, **exc.headers})
    except asyncio.CancelledError:
        finish("cancelled")
        raise
    except BaseException:
        finish("error_500")
        raise
    if isinstance(answer, JsonAnswer):
        metrics.first_byte_seconds.observe(time.monotonic() - started)
        finish("ok")
        return _json(answer.body, answer.status, headers)
    relay = answer.chunks
    relay.on_first_byte = lambda: metrics.first_byte_seconds.observe(time.monotonic() - started)
    relay.add_close_callback(lambda: finish("ok" if relay.saw_done else "stream_error"))
    response = Response(relay, 200, headers={**headers, **_SSE_HEADERS})
    response.mimetype = "text/event-stream"
    response.timeout = None
    return response


async def _models(proxy: ProxyState) -> Response:
    """The union of the models the routable instances serve (as vLLM lists them)."""
    entries = proxy.registry.healthy("P") + proxy.registry.healthy("D")
    if not entries:
        return _json(error_body("no instance is registered", 503), 503)

    async def fetch(entry: Entry) -> list[dict[str, Any]]:
        try:
            payload = await proxy.upstream.get_json(
                entry.instance.base_url + "/v1/models", _MODELS_TIMEOUT
            )
        except UpstreamError as exc:
            log.warning("listing models of %s failed: %s", entry.instance.http_address, exc)
            return []
        data = payload.get("data") if isinstance(payload, dict) else None
        return [m for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    seen: dict[str, dict[str, Any]] = {}
    for listing in await asyncio.gather(*(fetch(e) for e in entries)):
        for model in listing:
            seen.setdefault(model["id"], model)
    if not seen:
        return _json(error_body("no instance answered its model list", 502), 502)
    return _json({"object": "list", "data": list(seen.values())})


def _not_ready(proxy: ProxyState) -> str | None:
    if proxy.draining:
        return "draining"
    registry = proxy.registry
    missing = [
        name for role, name in (("P", "prefill"), ("D", "decode")) if not registry.healthy(role)
    ]
    if missing:
        return f"no {' and no '.join(missing)} instance registered"
    return None


def _describe(proxy: ProxyState, entry: Entry) -> dict[str, Any]:
    registry = proxy.registry
    inst = entry.instance
    silence = registry.silence(entry)
    return {
        "role": inst.role,
        "http_address": inst.http_address,
        "zmq_address": inst.zmq_address,
        "transfer_mode": inst.transfer_mode,
        "dp_size": inst.dp_size,
        "tp_size": inst.tp_size,
        "static": entry.static,
        "age_seconds": round(registry.age(entry), 3),
        "seconds_since_heartbeat": None if entry.static else round(silence, 3),
        "state": (
            "ejected"
            if registry.is_ejected(entry)
            else "healthy"
            if entry.static or silence <= registry.ttl
            else "stale"
        ),
        "consecutive_failures": entry.failures,
        "inflight": entry.total_inflight,
        "inflight_by_dp_rank": entry.inflight[: inst.dp_size],
    }


def _watch_registry(proxy: ProxyState) -> None:
    """Log and count registry changes; the registry itself knows nothing of either."""
    registry, metrics = proxy.registry, proxy.metrics

    def added(_sender: Any, entry: Entry, **_: Any) -> None:
        inst = entry.instance
        metrics.instances.labels(inst.role).inc()
        log.info(
            "registered %s instance %s (%s, dp=%d, tp=%d, %s)",
            inst.role,
            inst.http_address,
            inst.zmq_address,
            inst.dp_size,
            inst.tp_size,
            inst.transfer_mode,
        )

    def removed(_sender: Any, entry: Entry, reason: str = "", **_: Any) -> None:
        inst = entry.instance
        metrics.instances.labels(inst.role).dec()
        metrics.evictions.labels(inst.role).inc()
        log.warning("removed %s instance %s: %s", inst.role, inst.http_address, reason)

    registry.instance_added.connect(added, sender=registry, weak=False)
    registry.instance_removed.connect(removed, sender=registry, weak=False)
