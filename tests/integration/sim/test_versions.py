"""The simulator as vLLM 0.32 and as 0.33, by hand: GET /version, a READ decode without
remote prefill, kv_transfer_params in SSE chunks, a WRITE decode whose prefill gave up
waiting for its blocks (write_failed), mixed TP sizes, and mixed versions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import aiohttp
import pytest

from moriio_proxy.sim import SimInstance, expected_text
from tests.harness.legs import (
    PROMPT,
    post,
    prefill_body,
    prefill_params,
    sandwich,
    sim,
    write_decode_params,
)
from tests.harness.waiting import PROMPTLY, eventually, still_pending

VERSIONS = ["0.32", "0.33"]
KV_ERROR = {
    "message": "Internal server error",
    "type": "InternalServerError",
    "param": None,
    "code": 500,
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_version_route(http: aiohttp.ClientSession, version: str) -> None:
    async with sim("D", vllm_version=version) as d, http.get(d.url + "/version") as r:
        assert r.status == 200
        assert await r.json() == {"version": f"{version}.0"}


async def test_033_read_decode_computes_a_prompt_sent_without_remote_prefill(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("D", mode="READ", vllm_version="0.33") as d:
        status, body = await post(http, d, {"prompt": PROMPT, "max_tokens": 5})
        assert status == 200
        assert body["choices"][0]["text"] == expected_text(PROMPT, 5)
        assert d.stats.garbage_outputs == 0


# ------------------------------------------------------------- kv_transfer_params in SSE


async def raw_stream(
    http: aiohttp.ClientSession, inst: SimInstance, body: dict[str, Any], path: str
) -> tuple[bytes, list[Any]]:
    async with http.post(inst.url + path, json=body) as r:
        assert r.status == 200
        raw = await r.read()
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return raw, events


@pytest.mark.parametrize("version", VERSIONS)
async def test_completions_chunks_carry_kv_params_from_033(
    http: aiohttp.ClientSession, version: str
) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with sim("D", mode="WRITE", vllm_version=version) as d:
        raw, events = await raw_stream(http, d, body, "/v1/completions")
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) == 3 and events[-1] == "[DONE]" and usage["choices"] == []
    assert "kv_transfer_params" not in usage
    if version == "0.32":
        assert b"kv_transfer_params" not in raw
    else:
        assert all(list(c)[-1] == "kv_transfer_params" for c in chunks)  # the last field
        assert all(c["kv_transfer_params"] is None for c in chunks)
        assert raw.count(b',"kv_transfer_params":null}') == 3  # compact, as pydantic


@pytest.mark.parametrize("version", VERSIONS)
async def test_chat_content_chunks_carry_kv_params_from_033(
    http: aiohttp.ClientSession, version: str
) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "stream": True}
    async with sim("D", vllm_version=version) as d:
        _, events = await raw_stream(http, d, body, "/v1/chat/completions")
    role, content = events[0], events[1:-1]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "kv_transfer_params" not in role
    assert len(content) == 2
    assert all(("kv_transfer_params" in c) == (version == "0.33") for c in content)


async def test_a_033_producer_streams_its_params_on_the_finishing_chunk(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", vllm_version="0.33") as p:
        body = dict(prefill_body(prefill_params("tx-s")), stream=True)
        _, events = await raw_stream(http, p, body, "/v1/completions")
    (final,) = events[:-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["kv_transfer_params"]["transfer_id"] == "tx-s"


# ------------------------------------------------------- a WRITE that never happens


async def abandon(task: asyncio.Future[Any]) -> None:
    """The client gives up on a decode that will never answer."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def unrelated_id() -> str:
    """A request id without the sandwich: each leg then uses its explicit remote_* keys."""
    return f"req-{uuid.uuid4().hex}"


def decode_body(kv: dict[str, Any], stream: bool = False, chat: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": 3, "stream": stream, "kv_transfer_params": kv}
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return body


async def prefill_then_give_up(http: aiohttp.ClientSession, p: SimInstance, d: SimInstance) -> str:
    """A prefill leg whose decode never announces its blocks: P waits defer_timeout."""
    tid = f"tx-{uuid.uuid4().hex}"
    status, _ = await post(http, p, prefill_body(prefill_params(tid, d)), {"X-Request-Id": "r"})
    assert status == 200
    return tid


@pytest.mark.parametrize(("stream", "chat"), [(False, False), (True, False), (True, True)])
async def test_033_decode_fails_a_request_whose_prefill_gave_up(
    http: aiohttp.ClientSession, stream: bool, chat: bool
) -> None:
    async with (
        sim("P", mode="WRITE", defer_timeout=0.2) as p,
        sim("D", mode="WRITE", dp_size=2) as d,
    ):
        tid = await prefill_then_give_up(http, p, d)
        await eventually(lambda: p.stats.write_failed_sent == 2)  # every decode DP rank
        assert p.held_transfers() == 0
        # The decode's request arrives late (queued longer than P's defer_timeout).
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = decode_body(write_decode_params(tid, p), stream, chat)
        async with http.post(d.url + path, json=body, headers={"X-Request-Id": "r"}) as r:
            raw = await r.read()
            status = r.status
        assert d.stats.kv_load_failures == 1 and d.dead_reason is None
        if not stream:
            assert status == 500
            assert json.loads(raw) == {"error": KV_ERROR}
            return
        assert status == 200  # the head went out before the engine's first output
        lines = [line for line in raw.decode().split("\n\n") if line]
        if chat:  # the role chunk first, then the error, compact
            assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"
            lines = lines[1:]
            assert lines[0] == "data: " + json.dumps({"error": KV_ERROR}, separators=(",", ":"))
        else:
            assert lines[0] == "data: " + json.dumps({"error": KV_ERROR})
        assert lines[1:] == ["data: [DONE]"]


async def test_033_decode_waiting_for_a_lost_allocation_fails_after_defer_timeout(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        sim("P", mode="WRITE", defer_timeout=0.3) as p,
        sim("D", mode="WRITE") as d,
    ):
        tid = f"tx-{uuid.uuid4().hex}"
        kv = dict(write_decode_params(tid, p), remote_notify_port=1)  # the allocation is lost
        headers = {"X-Request-Id": unrelated_id()}
        d_task = asyncio.ensure_future(post(http, d, decode_body(kv), headers))
        await eventually(lambda: d.pending_kv_waiters() == 1)
        p_status, _ = await post(http, p, prefill_body(prefill_params(tid, d)), headers)
        assert p_status == 200
        status, body = await asyncio.wait_for(d_task, PROMPTLY)
        assert status == 500 and body == {"error": KV_ERROR}
        assert d.pending_kv_waiters() == 0 and d.stats.kv_load_failures == 1


async def test_032_prefill_gives_up_silently_and_the_decode_waits_forever(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        sim("P", mode="WRITE", defer_timeout=0.1, vllm_version="0.32") as p,
        sim("D", mode="WRITE") as d,
    ):
        tid = await prefill_then_give_up(http, p, d)
        await eventually(lambda: p.held_transfers() == 0)
        d_task = asyncio.ensure_future(
            post(http, d, decode_body(write_decode_params(tid, p)), {"X-Request-Id": "r"})
        )
        assert await still_pending(d_task, 0.5)
        assert p.stats.write_failed_sent == 0 and d.pending_kv_waiters() == 1
        await abandon(d_task)


async def test_write_failed_kills_a_032_decodes_notify_listener(
    http: aiohttp.ClientSession,
) -> None:
    """0.33 prefill, 0.32 decode: after one write_failed that decode rank never hears of a
    finished write again, while it keeps serving and heartbeating."""
    async with (
        sim("P", mode="WRITE", defer_timeout=0.2) as p,
        sim("D", mode="WRITE", vllm_version="0.32") as d,
    ):
        await prefill_then_give_up(http, p, d)
        await eventually(lambda: p.stats.write_failed_sent == 1)
        # The message reaches the decode's listener, which dies.
        await eventually(lambda: d.stats.notify_listeners_died == 1)
        rid, tid = sandwich(p, d), "tx-after"
        d_task = asyncio.ensure_future(
            post(http, d, decode_body(write_decode_params(tid, p)), {"X-Request-Id": rid})
        )
        await post(http, p, prefill_body(prefill_params(tid, d)), {"X-Request-Id": rid})
        await eventually(lambda: p.stats.kv_writes_sent == 1)  # P wrote...
        assert await still_pending(d_task, 0.5)  # ...but the decode never hears of it
        assert d.dead_reason is None and d.stats.kv_load_failures == 0
        await abandon(d_task)


# ----------------------------------------------------------------------- mixed TP


async def write_pair(
    http: aiohttp.ClientSession,
    p: SimInstance,
    d: SimInstance,
    *,
    prefill_kv: dict[str, Any] | None = None,
    decode_kv: dict[str, Any] | None = None,
) -> asyncio.Future[tuple[int, dict[str, Any]]]:
    """Both WRITE legs with the real TP sizes unless overridden; the decode's answer."""
    rid, tid = sandwich(p, d), f"tx-{uuid.uuid4().hex}"
    pkv = dict(prefill_params(tid, d), **(prefill_kv or {}))
    dkv = dict(write_decode_params(tid, p), **(decode_kv or {}))
    d_task = asyncio.ensure_future(post(http, d, decode_body(dkv), {"X-Request-Id": rid}))
    await eventually(lambda: d.pending_kv_waiters() == 1)
    await post(http, p, prefill_body(pkv), {"X-Request-Id": rid})
    return d_task


@pytest.mark.parametrize(("p_tp", "d_tp"), [(2, 4), (4, 2), (1, 8)])
async def test_033_maps_divisible_tp_sizes_in_write_mode(
    http: aiohttp.ClientSession, p_tp: int, d_tp: int
) -> None:
    async with (
        sim("P", mode="WRITE", tp_size=p_tp) as p,
        sim("D", mode="WRITE", tp_size=d_tp) as d,
    ):
        status, body = await asyncio.wait_for(await write_pair(http, p, d), PROMPTLY)
        assert status == 200
        assert body["choices"][0]["text"] == expected_text(PROMPT, 3)


async def test_033_prefill_dies_on_tp_sizes_that_do_not_divide(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", mode="WRITE", tp_size=2) as p, sim("D", mode="WRITE", tp_size=3) as d:
        status, body = await post(
            http, p, prefill_body(prefill_params("tx-3", d)), {"X-Request-Id": sandwich(p, d)}
        )
        assert status == 500 and "EngineCore died" in body["error"]["message"]
        assert p.dead_reason is not None and "one TP size must divide" in p.dead_reason


async def test_033_wrong_remote_tp_size_on_the_prefill_leg_leaves_the_decode_waiting(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", mode="WRITE", tp_size=2) as p, sim("D", mode="WRITE", tp_size=4) as d:
        d_task = await write_pair(http, p, d, prefill_kv={"remote_tp_size": 2, "tp_size": 2})
        assert await still_pending(d_task, 0.5)
        assert p.stats.kv_writes_sent == 0 and p.dead_reason is None
        await abandon(d_task)


async def test_033_wrong_remote_tp_size_on_the_decode_leg_fails_after_defer_timeout(
    http: aiohttp.ClientSession,
) -> None:
    """The decode's allocation reaches one of the prefill's two TP ranks: the other never
    writes, and gives up after defer_timeout."""
    async with (
        sim("P", mode="WRITE", tp_size=2, defer_timeout=0.3) as p,
        sim("D", mode="WRITE", tp_size=2) as d,
    ):
        d_task = await write_pair(http, p, d, decode_kv={"remote_tp_size": 1, "tp_size": 1})
        status, body = await asyncio.wait_for(d_task, PROMPTLY)
        assert status == 500 and body == {"error": KV_ERROR}
        assert p.stats.kv_writes_sent == 0 and p.stats.write_failed_sent == 1


@pytest.mark.parametrize(("p_version", "d_version"), [("0.32", "0.33"), ("0.33", "0.32")])
async def test_mixed_tp_with_a_032_side_leaves_the_decode_waiting(
    http: aiohttp.ClientSession, p_version: str, d_version: str
) -> None:
    async with (
        sim("P", mode="WRITE", tp_size=2, vllm_version=p_version) as p,
        sim("D", mode="WRITE", tp_size=4, vllm_version=d_version) as d,
    ):
        d_task = await write_pair(http, p, d)
        assert await still_pending(d_task, 0.5)
        assert p.stats.kv_writes_sent == 0 and p.dead_reason is None
        await abandon(d_task)


@pytest.mark.parametrize("version", VERSIONS)
async def test_equal_tp_pairs_work_across_versions(
    http: aiohttp.ClientSession, version: str
) -> None:
    """A 0.32 prefill with a 0.33 decode and the reverse, both TP 2: the write lands."""
    other = "0.33" if version == "0.32" else "0.32"
    async with (
        sim("P", mode="WRITE", tp_size=2, vllm_version=version) as p,
        sim("D", mode="WRITE", tp_size=2, vllm_version=other) as d,
    ):
        status, body = await asyncio.wait_for(await write_pair(http, p, d), PROMPTLY)
        assert status == 200
        assert body["choices"][0]["text"] == expected_text(PROMPT, 3)


@pytest.mark.parametrize("version", VERSIONS)
async def test_read_mode_with_another_tp_size_kills_the_decode(
    http: aiohttp.ClientSession, version: str
) -> None:
    async with (
        sim("P", tp_size=2, vllm_version=version) as p,
        sim("D", tp_size=4, vllm_version=version) as d,
    ):
        rid = sandwich(p, d)
        _, answer = await post(
            http, p, prefill_body(prefill_params("tx-r", d)), {"X-Request-Id": rid}
        )
        kv = dict(answer["kv_transfer_params"], do_remote_prefill=True, do_remote_decode=False)
        status, _ = await post(http, d, decode_body(kv), {"X-Request-Id": rid})
        assert status == 500
        assert d.dead_reason is not None and "prefill TP 2 and decode TP 4" in d.dead_reason
