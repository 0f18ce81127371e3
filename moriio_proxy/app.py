"""The Quart app: health, readiness, metrics and model-list routes (the admin and profiler
routes come from admin/routes.py), startup and shutdown, with the generation routes
mounted in front of it (completions.py).

``create_app(config)`` builds everything a request needs as objects owned by the app (no
module-level state), so tests build as many independent proxies as they like in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from .admin.routes import add_admin_routes
from .completions import ASGIApp, CompletionsEndpoint
from .config import ProxyConfig
from .disagg import Disaggregator
from .discovery import DiscoverySource, make_discovery
from .discovery.mirror import fleet_inflight_of
from .metrics import CONTENT_TYPE, InstanceLoad, Metrics
from .policies import LoadBound, PolicySettings, make_decode_policy, make_prefill_policy
from .protocol import error_body
from .registry import Entry, Registry
from .security import AccessGuard, KeyLimits, KeyRing
from .state import (
    ProxyState,
    build_access_log,
    build_registry,
    build_tracing,
    build_upstream,
)
from .upstream import UpstreamError
from .version_probe import VersionProbe

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("moriio_proxy")

_MODELS_TIMEOUT = 3.0


def state(app: Quart) -> ProxyState:
    proxy: ProxyState = app.extensions["moriio_proxy"]
    return proxy


DiscoveryFactory = Callable[[Registry, Metrics], DiscoverySource]


def create_app(
    config: ProxyConfig,
    discovery: DiscoveryFactory | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    tracing: Tracing | None = None,
) -> Quart:
    """The proxy as a Quart app; ``discovery`` replaces the configured source (a worker
    of ``serve --workers N`` mirrors its supervisor's registry instead); ``clock`` is the
    registry's (TTLs, ejection periods), which a test may move instead of sleeping;
    ``tracing`` replaces the one ``--otlp-traces-endpoint`` builds (a test's exporter)."""
    app = Quart("moriio_proxy")
    # Streams last as long as generation does; our own timeouts bound every upstream wait.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    registry = build_registry(config, clock)
    metrics = Metrics()
    upstream = build_upstream(config)
    source = (discovery or partial(make_discovery, config))(registry, metrics)
    policy_settings = PolicySettings(
        bound=LoadBound(config.balance_abs_threshold, config.balance_rel_threshold),
        block_chars=config.cache_block_chars,
        max_blocks=config.cache_max_blocks,
    )
    disagg = Disaggregator(
        registry,
        upstream,
        metrics,
        prefill_policy=make_prefill_policy(config.prefill_policy, policy_settings),
        decode_policy=make_decode_policy(config.decode_policy, policy_settings),
        max_retries=config.max_retries,
        retry_backoff=config.retry_backoff,
        request_timeout=config.request_timeout,
    )
    # Only the source of truth asks instances for their version; a worker's mirror is
    # told by the supervisor.
    versions = VersionProbe(registry, upstream) if source.announce else None
    keys = KeyRing(config.api_key, config.api_key_file)
    limits = KeyLimits(config.max_inflight_per_key, config.rate_limit_per_key)
    proxy = ProxyState(
        config,
        registry,
        metrics,
        upstream,
        source,
        disagg,
        versions,
        access_log=build_access_log(config),
        tracing=tracing if tracing is not None else build_tracing(config),
        keys=keys,
        limits=limits,
    )
    app.extensions["moriio_proxy"] = proxy
    metrics.watch(lambda: [_load(e) for e in registry.entries()])

    def forget(_: Registry, entry: Entry, **__: Any) -> None:
        metrics.forget_instance(entry.instance.role, entry.instance.http_address)

    registry.instance_removed.connect(forget, sender=registry, weak=False)

    app.before_serving(proxy.start)
    app.after_serving(proxy.stop)
    # The generation routes bypass Quart (see completions.py); the rest is Quart's, behind
    # the one access check of every other path (security/guard.py).
    keyed = {"/ready": config.ready_requires_key, "/metrics": config.metrics_requires_key}
    guarded = AccessGuard(
        cast(ASGIApp, app.asgi_app),
        keys,
        admin_token=config.admin_token,
        allow_localhost=config.admin_allow_localhost,
        keyed_paths=frozenset(path for path, wanted in keyed.items() if wanted),
        max_head=config.max_header_bytes,
    )
    app.asgi_app = CompletionsEndpoint(proxy, guarded)  # type: ignore[method-assign,assignment]

    @app.get("/v1/models")
    async def models() -> Response:
        return await _models(proxy)

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        reason = proxy.not_ready()
        if reason:
            return _json({"status": "not ready", "reason": reason}, 503)
        return _json({"status": "ready", "transfer_mode": registry.mode})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), 200, content_type=CONTENT_TYPE)

    add_admin_routes(app, proxy)

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


async def _models(proxy: ProxyState) -> Response:
    """The union of the models the routable instances serve (as vLLM lists them)."""
    entries = proxy.registry.healthy("P") + proxy.registry.healthy("D")
    client_key = request.headers.get("Authorization")
    forwarded: dict[str, str] | None = None
    if proxy.config.upstream_auth == "passthrough" and client_key:
        forwarded = {"Authorization": client_key}
    if not entries:
        return _json(error_body("no instance is registered", 503), 503)

    async def fetch(entry: Entry) -> list[dict[str, Any]]:
        try:
            payload = await proxy.upstream.get_json(
                entry.instance.base_url + "/v1/models", _MODELS_TIMEOUT, forwarded
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


def _load(entry: Entry) -> InstanceLoad:
    """An instance for the scrape-time gauges; in flight: every worker's legs."""
    inst = entry.instance
    return InstanceLoad(inst.role, inst.http_address, sum(fleet_inflight_of(entry)))
