"""Unit tests of the simulated vLLM 0.32 + MoRIIOConnector instance, driven directly by HTTP.

No proxy here: each test plays the proxy's role by hand, so the simulator's own fidelity is
what is under test (the integration tests later trust it to catch proxy mistakes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from moriio_proxy.sim import (
    EOS_MARKER,
    SimConfig,
    SimInstance,
    chat_prompt_text,
    expected_text,
    kv_fingerprint,
)

PROMPT = "the quick brown fox jumps over the lazy dog again and again"


@contextlib.asynccontextmanager
async def sim(role: str, mode: str = "READ", **kw: Any) -> AsyncIterator[SimInstance]:
    kw.setdefault("transfer_timeout", 1.0)
    inst = SimInstance(SimConfig(role=role, mode=mode, **kw))
    await inst.start()
    try:
        yield inst
    finally:
        await inst.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def sandwich(p: SimInstance, d: SimInstance) -> str:
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


# ------------------------------------------------------------------ plain requests


async def test_plain_completion_exact_tokens_and_usage(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        status, body = await post(
            http, p, {"prompt": PROMPT, "max_tokens": 7}, {"X-Request-Id": "abc"}
        )
    assert status == 200
    assert body["id"] == "cmpl-abc"
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == expected_text(PROMPT, 7)
    assert len(words(choice["text"])) == 7
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    n_prompt = len(words(PROMPT))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == n_prompt + 7
    assert body["kv_transfer_params"] is None
    assert p.stats.requests == 1 and p.stats.completed == 1


async def test_default_max_tokens_token_ids_prompt_and_random_id(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", default_max_tokens=5) as p:
        status, body = await post(http, p, {"prompt": [11, 22, 33]})
        assert status == 200
        assert body["choices"][0]["text"] == expected_text("11 22 33", 5)
        assert body["id"].startswith("cmpl-") and len(body["id"]) > len("cmpl-")
        _, body2 = await post(http, p, {"prompt": ["11 22 33"], "max_tokens": 5})
        assert body2["choices"][0]["text"] == body["choices"][0]["text"]


async def test_streaming_equals_non_streaming(http: aiohttp.ClientSession) -> None:
    async with sim("P", token_latency=0.001) as p:
        _, full = await post(http, p, {"prompt": PROMPT, "max_tokens": 6})
        status, events = await post_sse(
            http,
            p,
            {
                "prompt": PROMPT,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {"X-Request-Id": "sid"},
        )
    assert status == 200
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6
    token_chunks = events[:-2]
    assert len(token_chunks) == 6
    assert all(c["id"] == "cmpl-sid" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 5 + ["length"]


async def test_chat_plain_and_streaming(http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with sim("P") as p:
        status, body = await post(
            http,
            p,
            {"messages": messages, "max_completion_tokens": 4, "max_tokens": 9},
            {"X-Request-Id": "c1"},
            path="/v1/chat/completions",
        )
        assert status == 200
        assert body["id"] == "chatcmpl-c1"
        assert body["object"] == "chat.completion"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant"
        assert msg["content"] == expected_text(chat_prompt_text(messages), 4)
        _, events = await post_sse(
            http,
            p,
            {"messages": messages, "max_tokens": 4, "stream": True},
            {"X-Request-Id": "c2"},
            path="/v1/chat/completions",
        )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-c2" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert content == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stop_string_truncates(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        full = expected_text(PROMPT, 8)
        stop_word = full.split()[3]
        status, body = await post(http, p, {"prompt": PROMPT, "max_tokens": 8, "stop": [stop_word]})
        _, events = await post_sse(
            http, p, {"prompt": PROMPT, "max_tokens": 8, "stop": stop_word, "stream": True}
        )
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop_word
    assert choice["text"] == full[: full.index(stop_word)]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]


async def test_bad_requests(http: aiohttp.ClientSession) -> None:
    async with sim("P", max_model_len=20) as p:
        async with http.post(p.url + "/v1/completions", data=b"{nope") as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["type"] == "BadRequestError" and err["code"] == 400
        status, body = await post(http, p, {"max_tokens": 3})
        assert status == 400
        status, body = await post(http, p, {"max_tokens": 3}, path="/v1/chat/completions")
        assert status == 400
        status, body = await post(
            http, p, {"prompt": PROMPT, "stream_options": {"include_usage": True}}
        )
        assert status == 400
        assert body["error"]["message"] == "Stream options can only be defined when `stream=True`."
        status, _ = await post(http, p, {"prompt": " ".join(["w"] * 21)})
        assert status == 400
        # prompt + max_tokens > max_model_len is clamped by 0.32's get_max_tokens, not refused
        status, body = await post(http, p, {"prompt": " ".join(["w"] * 18), "max_tokens": 10})
        assert status == 200
        assert body["usage"]["completion_tokens"] == 2
        status, _ = await post(http, p, {"prompt": PROMPT, "max_tokens": 1, "min_tokens": 2})
        assert status == 400
        assert p.stats.errors_4xx == 6


async def test_data_parallel_rank_header(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2) as p:
        status, body = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "2"})
        assert status == 400
        assert "out of range" in body["error"]["message"]
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "-1"})
        assert status == 400
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "one"})
        assert status == 200  # a non-integer header is ignored
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "1"})
        assert status == 200
        assert p.legs[-1].dp_rank == 1
        assert sum(p.stats.per_rank.values()) == 2


async def test_models_and_health(http: aiohttp.ClientSession) -> None:
    async with sim("D", model="m1") as d:
        async with http.get(d.url + "/v1/models") as r:
            body = await r.json()
        assert body["object"] == "list" and body["data"][0]["id"] == "m1"
        async with http.get(d.url + "/health") as r:
            assert r.status == 200
        status, body = await post(http, d, {"prompt": PROMPT, "model": "other"})
        assert status == 404


# ------------------------------------------------------------------ prefill leg


async def test_prefill_leg_shape(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2) as p:
        status, body = await post(
            http, p, prefill_body(prefill_params("tx-1")), {"X-data-parallel-rank": "1"}
        )
        assert status == 200
        kv = body["kv_transfer_params"]
        assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
        assert isinstance(kv["remote_block_ids"], list)
        assert isinstance(kv["remote_block_ids"][0], list)
        assert all(isinstance(b, int) for b in kv["remote_block_ids"][0])
        assert kv["remote_engine_id"] == f"127.0.0.1:{p.handshake_base}"
        assert kv["remote_host"] == "127.0.0.1"
        assert kv["remote_handshake_port"] == str(p.handshake_base)
        assert kv["remote_notify_port"] == str(p.notify_base)
        assert kv["remote_dp_rank"] == 1 and kv["remote_dp_rank_override"] is True
        assert kv["remote_dp_size"] == 2 and kv["remote_dp_size_local"] == 2
        assert kv["tp_size"] == 1 and kv["transfer_id"] == "tx-1"
        assert body["choices"][0]["text"] == expected_text(PROMPT, 1)
        assert p.held_transfers() == 1
        # without transfer_id 0.32 makes one up that no decode can match
        _, body = await post(http, p, prefill_body(prefill_params(None)))
        assert body["kv_transfer_params"]["transfer_id"].startswith("sidecar-")


async def test_eos_marker_prefill_returns_null_params(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        status, body = await post(
            http, p, prefill_body(prefill_params("tx-e"), f"{PROMPT} {EOS_MARKER}")
        )
        assert status == 200
        assert body["kv_transfer_params"] is None
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["choices"][0]["text"] == ""
        assert p.held_transfers() == 0


async def test_defer_timeout_reaps_blocks(http: aiohttp.ClientSession) -> None:
    async with sim("P", defer_timeout=0.2) as p:
        await post(http, p, prefill_body(prefill_params("tx-r")))
        assert p.held_transfers() == 1
        await asyncio.sleep(0.4)
        assert p.held_transfers() == 0
        assert p.stats.blocks_reaped == 1


# ------------------------------------------------------------------ READ mode


async def test_read_flow_by_hand(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2) as p, sim("D") as d:
        rid = sandwich(p, d)
        status, pb = await post(
            http,
            p,
            prefill_body(prefill_params("tx-read", d)),
            {"X-Request-Id": rid, "X-data-parallel-rank": "1"},
        )
        assert status == 200
        kv = dict(pb["kv_transfer_params"])
        status, db = await post(
            http,
            d,
            {"prompt": PROMPT, "max_tokens": 9, "kv_transfer_params": kv},
            {"X-Request-Id": rid},
        )
        assert status == 200
        assert db["choices"][0]["text"] == expected_text(PROMPT, 9)
        assert d.stats.kv_received == 1 and d.stats.garbage_outputs == 0
        assert p.stats.kv_reads_served == 1
        for _ in range(50):  # the release notify frees P's blocks
            if p.held_transfers() == 0:
                break
            await asyncio.sleep(0.01)
        assert p.held_transfers() == 0


async def test_read_flow_explicit_keys_without_sandwich(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p, sim("D") as d:
        _, pb = await post(http, p, prefill_body(prefill_params("tx-x", d)))
        status, db = await post(
            http,
            d,
            {"prompt": PROMPT, "max_tokens": 3, "kv_transfer_params": pb["kv_transfer_params"]},
        )
        assert status == 200
        assert db["choices"][0]["text"] == expected_text(PROMPT, 3)


async def test_read_wrong_dp_rank_gives_garbage(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2) as p, sim("D") as d:
        rid = sandwich(p, d)
        _, pb = await post(
            http,
            p,
            prefill_body(prefill_params("tx-w", d)),
            {"X-Request-Id": rid, "X-data-parallel-rank": "1"},
        )
        kv = dict(pb["kv_transfer_params"], remote_dp_rank=0)
        _, db = await post(
            http,
            d,
            {"prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": kv},
            {"X-Request-Id": rid},
        )
        assert db["choices"][0]["text"] != expected_text(PROMPT, 4)
        assert d.stats.garbage_outputs == 1


async def test_read_missing_block_ids_or_engine_id_gives_garbage(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P") as p, sim("D") as d:
        rid = sandwich(p, d)
        _, pb = await post(http, p, prefill_body(prefill_params("tx-g", d)), {"X-Request-Id": rid})
        good = pb["kv_transfer_params"]
        no_blocks = {k: v for k, v in good.items() if k != "remote_block_ids"}
        no_engine = {k: v for k, v in good.items() if k != "remote_engine_id"}
        empty = dict(good, remote_block_ids=[])
        for kv in (no_blocks, no_engine, empty):
            status, db = await post(
                http,
                d,
                {"prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": kv},
                {"X-Request-Id": rid},
            )
            assert status == 200
            assert db["choices"][0]["text"] != expected_text(PROMPT, 4)
        assert d.stats.garbage_outputs == 3
        assert d.dead_reason is None


async def test_read_flattened_block_ids_kill_the_decode_engine(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P") as p, sim("D") as d:
        rid = sandwich(p, d)
        _, pb = await post(http, p, prefill_body(prefill_params("tx-f", d)), {"X-Request-Id": rid})
        kv = dict(pb["kv_transfer_params"])
        kv["remote_block_ids"] = kv["remote_block_ids"][0]  # flattened, as a buggy proxy would
        status, db = await post(
            http,
            d,
            {"prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": kv},
            {"X-Request-Id": rid},
        )
        assert status == 500
        assert db["error"]["type"] == "InternalServerError"
        assert d.dead_reason is not None and "remote_block_ids" in d.dead_reason


async def test_plain_request_to_read_decode_is_garbage(http: aiohttp.ClientSession) -> None:
    async with sim("D", mode="READ") as d:
        _, body = await post(http, d, {"prompt": PROMPT, "max_tokens": 5})
        assert body["choices"][0]["text"] != expected_text(PROMPT, 5)
        assert len(words(body["choices"][0]["text"])) == 5
        assert d.stats.garbage_outputs == 1
        # a one-token prompt has nothing external: the consumer computes it itself
        _, body = await post(http, d, {"prompt": "single", "max_tokens": 5})
        assert body["choices"][0]["text"] == expected_text("single", 5)


async def test_plain_request_to_write_decode_is_correct(http: aiohttp.ClientSession) -> None:
    async with sim("D", mode="WRITE") as d:
        _, body = await post(http, d, {"prompt": PROMPT, "max_tokens": 5})
        assert body["choices"][0]["text"] == expected_text(PROMPT, 5)


# ------------------------------------------------------------------ WRITE mode


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
        await asyncio.sleep(0.2)
        assert not d_task.done()
        await post(http, p, prefill_body(prefill_params("tx-o", d)), {"X-Request-Id": rid})
        status, db = await asyncio.wait_for(d_task, 5)
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
        await asyncio.sleep(0.5)
        assert not d_task.done()
        assert d.pending_kv_waiters() == 1
        d_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await d_task
        for _ in range(100):
            if d.stats.cancelled and d.stats.kv_wait_cancelled:
                break
            await asyncio.sleep(0.01)
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
        await asyncio.sleep(0.3)
        assert not d_task.done()
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
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh, fresh.get(p.url + "/health"):
                pass


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


# ------------------------------------------------------------------ heartbeat


async def test_heartbeat_reaches_router() -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
    try:
        async with sim(
            "D", mode="WRITE", dp_size=2, proxy=f"127.0.0.1:{port}", heartbeat_interval=0.1
        ) as d:
            frames = await asyncio.wait_for(router.recv_multipart(), 3)
            assert len(frames) == 2
            msg = msgpack.unpackb(frames[1], raw=False)
            assert msg == {
                "type": "D",
                "http_address": d.http_address,
                "zmq_address": d.zmq_address,
                "dp_size": 2,
                "tp_size": 1,
                "transfer_mode": "WRITE",
            }
            assert list(msg) == [
                "type",
                "http_address",
                "zmq_address",
                "dp_size",
                "tp_size",
                "transfer_mode",
            ]
            assert (
                d.zmq_address
                == f"host:127.0.0.1,handshake:{d.handshake_base},notify:{d.notify_base}"
            )
            d.heartbeating = False
            await asyncio.sleep(0.15)
            while await router.poll(0):
                await router.recv_multipart()
            assert await router.poll(300) == 0
            d.heartbeating = True
            assert await router.poll(1000) != 0
    finally:
        router.close(linger=0)
        ctx.term()


async def test_stop_is_idempotent_and_fingerprint_stable() -> None:
    inst = SimInstance(SimConfig(role="P"))
    await inst.stop()  # never started
    inst = SimInstance(SimConfig(role="P"))
    await inst.start()
    await inst.stop()
    await inst.stop()
    assert kv_fingerprint("a  b") == kv_fingerprint("a b")


# ------------------------------------------------------------------ more 0.32 facts


async def test_stop_string_on_the_single_prefill_token_keeps_params(
    http: aiohttp.ClientSession,
) -> None:
    """max_tokens 1: the scheduler length-caps before the detokenizer sees the stop string."""
    async with sim("P") as p:
        first = expected_text(PROMPT, 1).strip()
        kv = prefill_params("tx-s")
        body = {"prompt": PROMPT, "max_tokens": 1, "stop": [first], "kv_transfer_params": kv}
        _, out = await post(http, p, body)
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["kv_transfer_params"] is not None
        # min_tokens 1 suppresses the stop-string check for the one token
        _, out = await post(http, p, dict(body, min_tokens=1))
        assert out["choices"][0]["finish_reason"] == "length"
        # a stop string before the length cap aborts the request: params null
        second = expected_text(PROMPT, 2).split()[1]
        _, out = await post(
            http, p, dict(body, max_tokens=3, stop=[second], kv_transfer_params=prefill_params("t"))
        )
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["kv_transfer_params"] is None
        assert p.held_transfers() == 1  # only the first, length-capped leg holds blocks


async def test_multi_prompt_and_n(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        _, body = await post(http, p, {"prompt": ["a b c", "d e"], "max_tokens": 3, "n": 2})
        texts = {c["index"]: c["text"] for c in body["choices"]}
        assert texts == {
            0: expected_text("a b c", 3),
            1: expected_text("a b c", 3),
            2: expected_text("d e", 3),
            3: expected_text("d e", 3),
        }
        assert body["usage"] == {
            "prompt_tokens": 5,
            "total_tokens": 17,
            "completion_tokens": 12,
            "prompt_tokens_details": None,
        }
        status, _ = await post(http, p, {"prompt": "a", "n": 2, "temperature": 0})
        assert status == 400


async def test_client_disconnect_mid_stream_is_recorded(http: aiohttp.ClientSession) -> None:
    async with sim("P", token_latency=0.02) as p:
        async with http.post(
            p.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True}
        ) as r:
            await r.content.readline()
            r.close()
        for _ in range(100):
            if p.stats.cancelled:
                break
            await asyncio.sleep(0.01)
        assert p.stats.cancelled == 1
        assert p.legs[-1].cancelled and not p.legs[-1].finished


async def test_engine_death_fails_other_inflight_requests(http: aiohttp.ClientSession) -> None:
    async with sim("P", mode="WRITE", token_latency=0.05) as p:
        slow = asyncio.ensure_future(post(http, p, {"prompt": PROMPT, "max_tokens": 50}))
        await asyncio.sleep(0.1)
        bad = prefill_params("tx-z")  # no peer address at all: add_new_req raises
        status, _ = await post(http, p, prefill_body(bad))
        assert status == 500
        status, body = await asyncio.wait_for(slow, 5)
        assert status == 500
        assert body["error"]["message"].startswith("EngineCore died:")


async def test_run_sim_returns_1_when_the_engine_dies(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from moriio_proxy.sim import run_sim

    task = asyncio.ensure_future(run_sim(SimConfig(role="D", mode="WRITE")))
    line = ""
    for _ in range(200):
        await asyncio.sleep(0.01)
        line = capsys.readouterr().out
        if line:
            break
    assert "role=D" in line and "mode=WRITE" in line
    url = line.split("url=")[1].split()[0]
    async with http.post(
        url + "/v1/completions",
        json={"prompt": PROMPT, "kv_transfer_params": {"do_remote_prefill": True}},
    ) as r:
        assert r.status == 500
    assert await asyncio.wait_for(task, 5) == 1
