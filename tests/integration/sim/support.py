"""Playing the proxy's part by hand against simulated instances: start one, post legs, read
SSE, build the kv_transfer_params of each leg (docs/protocol.md section 3)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from moriio_proxy.sim import SimConfig, SimInstance

PROMPT = "the quick brown fox jumps over the lazy dog again and again"


@contextlib.asynccontextmanager
async def sim(role: str, mode: str = "READ", **kw: Any) -> AsyncIterator[SimInstance]:
    """A started instance on free ports (HTTP port 0; ZMQ bases picked below 32768)."""
    kw.setdefault("transfer_timeout", 1.0)
    inst = SimInstance(SimConfig(role=role, mode=mode, **kw))
    await inst.start()
    try:
        yield inst
    finally:
        await inst.stop()


async def wait_for(cond: Callable[[], object], timeout: float = 1.0) -> float:
    """Poll ``cond()`` until true; returns the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def still_pending(task: asyncio.Future[Any], seconds: float) -> bool:
    """True if ``task`` has not finished after ``seconds`` (it is left running)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


async def connection_refused(url: str, timeout: float = 2.0) -> bool:
    """Poll until a fresh connection to ``url`` is refused (a dead instance stops listening);
    False if it is still accepted after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(url):
                pass
        except aiohttp.ClientConnectionError:
            return True
        await asyncio.sleep(0.02)
    return False


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
    events: list[Any] = []
    async with http.post(inst.url + path, json=body, headers=headers or {}) as r:
        async for raw in r.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        return r.status, events


def data_lines(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def read_sse(resp: aiohttp.ClientResponse) -> tuple[list[Any], BaseException | None]:
    """Every SSE event until the stream ends or breaks (and the error it broke with)."""
    events: list[Any] = []
    try:
        async for raw in resp.content:
            events.extend(data_lines(raw))
    except aiohttp.ClientPayloadError as e:
        return events, e
    return events, None


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
