"""Playing the proxy's part by hand against simulated instances: start one, post legs, read
SSE, build the kv_transfer_params of each leg (docs/protocol.md section 3)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from moriio_proxy.sim import SimConfig, SimInstance

from .sse import read_sse
from .waiting import eventually

PROMPT = "the quick brown fox jumps over the lazy dog again and again"


@contextlib.asynccontextmanager
async def sim(role: str, mode: str = "READ", **settings: Any) -> AsyncIterator[SimInstance]:
    """A started instance that registers nowhere, on ports it binds itself."""
    inst = SimInstance(SimConfig(role=role, mode=mode, **settings))
    await inst.start()
    try:
        yield inst
    finally:
        await inst.stop()


async def refuses_connections(url: str) -> None:
    """Until a fresh connection to ``url`` is refused (a dead instance stops listening)."""

    async def refused() -> bool:
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(url):
                return False
        except aiohttp.ClientConnectionError:
            return True

    await eventually(refused, interval=0.02, what=f"connections to {url} refused")


def sandwich(p: SimInstance, d: SimInstance) -> str:
    """The X-Request-Id a router builds with both zmq addresses embedded."""
    return f"___prefill_addr_{p.zmq_address}___decode_addr_{d.zmq_address}_{uuid.uuid4().hex}"


def words(text: str) -> list[str]:
    return text.split()


async def post(
    http: aiohttp.ClientSession,
    inst: SimInstance,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/completions",
) -> tuple[int, dict[str, Any]]:
    async with http.post(inst.url + path, json=body, headers=headers or {}) as r:
        return r.status, await r.json()


async def post_sse(
    http: aiohttp.ClientSession,
    inst: SimInstance,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/completions",
) -> tuple[int, list[Any]]:
    """The status and every event; each line must be a ``data:`` line, as vLLM writes."""
    async with http.post(inst.url + path, json=body, headers=headers or {}) as r:
        return r.status, await read_sse(r, strict=True)


def prefill_params(tid: str | None, d: SimInstance | None = None) -> dict[str, Any]:
    """The prefill leg's kv_transfer_params per docs/protocol.md section 3."""
    params: dict[str, Any] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
    }
    if tid is not None:
        params["transfer_id"] = tid
    if d is not None:
        params.update(
            remote_host=d.config.host,
            remote_handshake_port=d.handshake_base,
            remote_notify_port=d.notify_base,
            remote_dp_size=d.config.dp_size,
            remote_tp_size=d.config.tp_size,
            tp_size=d.config.tp_size,
        )
    return params


def write_decode_params(tid: str | None, p: SimInstance, rank: int = 0) -> dict[str, Any]:
    params: dict[str, Any] = {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": p.config.host,
        "remote_handshake_port": p.handshake_base,
        "remote_notify_port": p.notify_base,
        "remote_dp_size": p.config.dp_size,
        "remote_tp_size": p.config.tp_size,
        "tp_size": p.config.tp_size,
        "remote_dp_rank": rank,
    }
    if tid is not None:
        params["transfer_id"] = tid
    return params


def prefill_body(kv: dict[str, Any], prompt: str = PROMPT) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": kv}
