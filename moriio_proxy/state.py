"""ProxyState: everything one proxy owns, built once by ``create_app`` and shared by the
Quart routes and the ASGI completions endpoint (so neither imports the other)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .access_log import AccessLog
from .config import ConfigError, ProxyConfig
from .disagg import Disaggregator
from .discovery import DiscoverySource
from .metrics import Metrics
from .protocol import Role
from .registry import Registry
from .security import KeyLimits, KeyRing, bearer, upstream_ssl_context
from .upstream import Timeouts, Upstream
from .version_probe import VersionProbe

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("moriio_proxy")

_ROLE_NAMES: tuple[tuple[Role, str], ...] = (("P", "prefill"), ("D", "decode"))


def build_registry(config: ProxyConfig, clock: Callable[[], float] = time.monotonic) -> Registry:
    """The registry a proxy process (or a worker's mirror) keeps, as configured."""
    return Registry(
        config.instance_ttl,
        pinned_mode=None if config.transfer_mode == "auto" else config.transfer_mode,
        eject_after=config.eject_after,
        eject_seconds=config.eject_seconds,
        clock=clock,
        https=config.upstream_scheme == "https",
    )


def build_upstream(config: ProxyConfig) -> Upstream:
    """The client for vLLM instances, with the configured bounds (not started yet)."""
    return Upstream(
        Timeouts(
            connect=config.connect_timeout,
            prefill=config.prefill_timeout,
            first_byte=config.decode_first_byte_timeout,
            idle=config.stream_idle_timeout,
        ),
        headers=upstream_headers(config),
        ssl_context=upstream_ssl_context(config),
    )


def upstream_headers(config: ProxyConfig) -> dict[str, str]:
    """Headers every upstream call carries: the fleet key, when one is configured. With
    ``--upstream-auth passthrough`` the client's own header rides on each leg instead
    (protocol/legs.py); with neither, no Authorization header at all (never "Bearer None")."""
    if config.upstream_auth == "none" or not config.upstream_api_key:
        return {}
    return {"Authorization": bearer(config.upstream_api_key).decode("ascii")}


def build_access_log(config: ProxyConfig) -> AccessLog | None:
    fmt = config.access_log_format
    return None if fmt == "off" else AccessLog(fmt)


def build_tracing(config: ProxyConfig) -> Tracing | None:
    """The OTLP tracer when ``--otlp-traces-endpoint`` is set; None (and no OpenTelemetry
    import at all) when it is not. ConfigError when the ``otel`` extra is missing."""
    if not config.otlp_traces_endpoint:
        return None
    return require_tracing().to_endpoint(config.otlp_traces_endpoint)


def require_tracing() -> type[Tracing]:
    """The tracing module's entry class; ConfigError with the install command without it."""
    try:
        from .tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            f"--otlp-traces-endpoint: OpenTelemetry is not installed ({exc.name or exc}); "
            "pip install 'moriio-proxy[otel]'"
        ) from None
    return Tracing


@dataclass
class ProxyState:
    """Everything the app owns; tests reach it through ``app.state(quart_app)``."""

    config: ProxyConfig
    registry: Registry
    metrics: Metrics
    upstream: Upstream
    discovery: DiscoverySource
    disagg: Disaggregator
    # Asks each instance for its vLLM version; None in a worker of serve --workers N,
    # whose versions come with the supervisor's snapshots.
    versions: VersionProbe | None = None
    keys: KeyRing = field(default_factory=KeyRing)
    limits: KeyLimits = field(default_factory=KeyLimits)
    access_log: AccessLog | None = None
    tracing: Tracing | None = None  # only with --otlp-traces-endpoint
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
        if self.versions is not None:
            await self.versions.start()
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.discovery.stop()
        if self.versions is not None:
            await self.versions.stop()
        await self.disagg.close()
        await self.upstream.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes: blocking

    def drain(self) -> None:
        """Start a graceful shutdown: /ready turns 503 and new requests are refused.

        An idle proxy's shutdown is routine (info); requests cut short if they outlast
        --drain-timeout are worth a warning.
        """
        if self.draining:
            return
        self.draining = True
        if self.inflight:
            log.warning(
                "draining: refusing new requests, waiting up to %gs for %d in flight",
                self.config.drain_timeout,
                self.inflight,
            )
        else:
            log.info("shutting down: nothing in flight")

    def not_ready(self) -> str | None:
        """Why the proxy cannot serve a request now, or None when it can."""
        if self.draining:
            return "draining"
        live = {role: self.registry.healthy(role) for role, _ in _ROLE_NAMES}
        missing = [name for role, name in _ROLE_NAMES if not live[role]]
        if missing:
            return f"no {' and no '.join(missing)} instance registered"
        drained = [name for role, name in _ROLE_NAMES if all(e.draining for e in live[role])]
        if drained:  # an operator drained every one: nothing new can be routed
            return f"every {' and every '.join(drained)} instance is draining"
        return None
