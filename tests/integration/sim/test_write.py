"""WRITE mode by hand: concurrent legs meeting on the prefill's notify port, in either order;
a decode whose KV never comes waits forever, malformed legs kill the engine (vLLM 0.32)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp

from moriio_proxy.sim import expected_text
from tests.harness.legs import (
    PROMPT,
    post,
    post_sse,
    prefill_body,
    prefill_params,
    refuses_connections,
    sandwich,
    sim,
    write_decode_params,
)
from tests.harness.waiting import STATE_TIMEOUT, eventually, still_pending


async def test_write_flow_by_hand(http: aiohttp.ClientSession) -> None:
    async with (
        sim("P", mode="WRITE", prefill_latency=0.05) as p,
        sim("D", mode="WRITE") as d,
    ):
        rid = sandwich(p, d)
        tid = f"tx-{uuid.uuid4().hex}"
        p_call = post(http, p, prefill_body(prefill_params(tid, d)), {"X-Request-Id": rid})
        d_call = post_sse(
            http,
            d,
            {
                "prompt": PROMPT,
                "max_tokens": 6,
                "stream": True,
                "kv_transfer_params": write_decode_params(tid, p),
            },
            {"X-Request-Id": rid},
        )
        (p_status, pb), (d_status, events) = await asyncio.gather(p_call, d_call)
        assert p_status == 200 and d_status == 200
        assert pb["kv_transfer_params"]["transfer_id"] == tid
        text = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]")
        assert text == expected_text(PROMPT, 6)
        assert p.stats.kv_writes_sent == 1 and d.stats.kv_received == 1
        assert p.held_transfers() == 0


async def test_write_decode_first_then_prefill(http: aiohttp.ClientSession) -> None:
    async with sim("P", mode="WRITE") as p, sim("D", mode="WRITE") as d:
        rid = sandwich(p, d)
        d_task = asyncio.ensure_future(
            post(
                http,
                d,
                {
                    "prompt": PROMPT,
                    "max_tokens": 2,
                    "kv_transfer_params": write_decode_params("tx-o", p),
                },
                {"X-Request-Id": rid},
            )
        )
        await eventually(lambda: d.pending_kv_waiters() == 1)
        assert not d_task.done()
        await post(http, p, prefill_body(prefill_params("tx-o", d)), {"X-Request-Id": rid})
        status, db = await asyncio.wait_for(d_task, STATE_TIMEOUT)
        assert status == 200
        assert db["choices"][0]["text"] == expected_text(PROMPT, 2)


async def test_write_decode_without_transfer_id_waits_forever(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", mode="WRITE") as p, sim("D", mode="WRITE") as d:
        rid = sandwich(p, d)
        p_status, _ = await post(
            http, p, prefill_body(prefill_params(None, d)), {"X-Request-Id": rid}
        )
        assert p_status == 200
        d_task = asyncio.ensure_future(
            post(
                http,
                d,
                {
                    "prompt": PROMPT,
                    "max_tokens": 2,
                    "kv_transfer_params": write_decode_params(None, p),
                },
                {"X-Request-Id": rid},
            )
        )
        await eventually(lambda: d.pending_kv_waiters() == 1)
        assert await still_pending(d_task, 0.5)
        assert d.pending_kv_waiters() == 1
        d_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await d_task
        await eventually(lambda: d.stats.cancelled and d.stats.kv_wait_cancelled)
        assert d.stats.cancelled == 1
        assert d.stats.kv_wait_cancelled == 1
        assert d.legs[-1].cancelled
        assert d.pending_kv_waiters() == 0
        assert d.dead_reason is None


async def test_write_override_on_other_rank_waits(http: aiohttp.ClientSession) -> None:
    async with sim("P", mode="WRITE") as p, sim("D", mode="WRITE", dp_size=2) as d:
        rid = sandwich(p, d)
        kv = dict(write_decode_params("tx-ov", p), remote_dp_rank_override=True)
        d_task = asyncio.ensure_future(
            post(
                http,
                d,
                {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": kv},
                {"X-Request-Id": rid, "X-data-parallel-rank": "1"},
            )
        )
        await post(http, p, prefill_body(prefill_params("tx-ov", d)), {"X-Request-Id": rid})
        await eventually(lambda: d.pending_kv_waiters() == 1)
        assert await still_pending(d_task, 0.3)
        d_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await d_task


async def test_write_prefill_missing_engine_id_key_kills_engine(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", mode="WRITE") as p, sim("D", mode="WRITE") as d:
        kv = prefill_params("tx-k", d)
        del kv["remote_engine_id"]
        status, body = await post(http, p, prefill_body(kv), {"X-Request-Id": sandwich(p, d)})
        assert status == 500
        assert "EngineCore died" in body["error"]["message"]
        assert p.dead_reason is not None and "remote_engine_id" in p.dead_reason
        await refuses_connections(p.url + "/health")


async def test_write_decode_without_address_dies_after_stream_started(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("D", mode="WRITE") as d:
        kv = {"do_remote_prefill": True, "transfer_id": "tx-n"}
        status, events = await post_sse(
            http, d, {"prompt": PROMPT, "stream": True, "kv_transfer_params": kv}
        )
        assert status == 200
        assert events[0]["error"]["code"] == 500
        assert events[-1] == "[DONE]"
        assert d.dead_reason is not None and "remote_host" in d.dead_reason
