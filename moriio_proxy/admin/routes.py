"""The admin API's HTTP routes, and vLLM's profiler routes, added to the proxy's Quart app.

``GET /admin/instances`` lists the registry (views.AdminInstances, the contract ``check``
reads). ``POST /admin/instances/<action>`` changes it (actions.py): every state-changing
route lives under ``/admin/`` so that one guard (an admin token) covers them all.
``POST /start_profile`` and ``/stop_profile`` fan out to every instance (profile.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from quart import Quart, Response, request

from ..discovery.mirror import fleet_inflight_of
from ..pairing import unpaired_reason
from ..protocol import error_body
from ..registry import Entry
from ..state import ProxyState
from ..views import AdminInstances, InstanceState, InstanceView
from .actions import ActionError, parse_action
from .profile import DEFAULT_TIMEOUT, MAX_TIMEOUT, fan_out


def add_admin_routes(app: Quart, proxy: ProxyState) -> None:
    """Register the admin and profiler routes on ``app``."""
    registry = proxy.registry

    @app.get("/admin/instances")
    async def admin_instances() -> Response:
        return _json(AdminInstances(registry.mode, describe_all(proxy)).to_json())

    @app.post("/admin/instances/<action>")
    async def admin_action(action: str) -> Response:
        try:
            parsed = parse_action(action, _json_body(await _raw_body()))
        except ActionError as exc:
            return _json(error_body(str(exc), exc.status), exc.status)
        outcome = await proxy.discovery.administer(parsed)
        if not outcome.ok:
            return _json(outcome.error(), outcome.status)
        entry = registry.get(parsed.key)  # None once removed
        view = None if entry is None else describe(proxy, entry, _live(proxy)).to_json()
        answer = {"action": parsed.name, "message": outcome.message, "instance": view}
        return _json(answer, outcome.status)

    async def profile(path: str) -> Response:
        try:
            timeout = float(request.args.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= MAX_TIMEOUT:
            message = f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}"
            return _json(error_body(message, 400), 400)
        # Prefills first, then decodes, each by address: the order an operator scans.
        entries = sorted(
            registry.entries(), key=lambda e: (e.instance.role != "P", e.instance.http_address)
        )
        if not entries:
            return _json(error_body("no instance is registered", 503), 503)
        body = await _raw_body()
        status, summary = await fan_out(proxy.upstream, entries, path, body, timeout)
        return _json(summary, status)

    @app.post("/start_profile")
    async def start_profile() -> Response:
        return await profile("/start_profile")

    @app.post("/stop_profile")
    async def stop_profile() -> Response:
        return await profile("/stop_profile")


async def _raw_body() -> bytes:
    data = await request.get_data()
    return data if isinstance(data, bytes) else data.encode()


def _json_body(raw: bytes) -> Any:
    """The request's JSON (an empty body is an empty object); ActionError when malformed."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ActionError(400, f"the body is not valid JSON: {exc}") from None


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")


def describe_all(proxy: ProxyState) -> tuple[InstanceView, ...]:
    """Every registered instance as ``/admin/instances`` shows it."""
    live = _live(proxy)
    return tuple(describe(proxy, e, live) for e in proxy.registry.entries())


def _live(proxy: ProxyState) -> dict[str, list[Entry]]:
    return {role: proxy.registry.healthy(role) for role in ("P", "D")}


def describe(proxy: ProxyState, entry: Entry, live: dict[str, list[Entry]]) -> InstanceView:
    """One instance for /admin/instances; ``live`` holds the healthy instances by role,
    the peers it is judged against for pairing."""
    registry = proxy.registry
    inst = entry.instance
    peers: Sequence[Entry] = live["D" if inst.role == "P" else "P"]
    silence = registry.silence(entry)
    inflight = fleet_inflight_of(entry)  # every worker's legs under serve --workers N
    condition: InstanceState = (
        "draining"  # the operator's word wins: it is what decides routing
        if entry.draining
        else "ejected"
        if registry.is_ejected(entry)
        else "healthy"
        if entry.static or silence <= registry.ttl
        else "stale"
    )
    return InstanceView(
        role=inst.role,
        http_address=inst.http_address,
        zmq_address=inst.zmq_address,
        transfer_mode=inst.transfer_mode,
        dp_size=inst.dp_size,
        tp_size=inst.tp_size,
        static=entry.static,
        age_seconds=round(registry.age(entry), 3),
        seconds_since_heartbeat=None if entry.static else round(silence, 3),
        state=condition,
        consecutive_failures=entry.failures,
        inflight=sum(inflight),
        inflight_by_dp_rank=inflight[: inst.dp_size],
        vllm_version=entry.vllm_version,
        unpaired=unpaired_reason(entry, peers, registry.mode or inst.transfer_mode),
        scheme=inst.scheme,
    )
