"""EngineCore's own paths, driven by hand over HTTP: the prefill leg (blocks held, the answer's
kv_transfer_params, defer_timeout reaping), plain requests on a consumer, engine death."""

from __future__ import annotations

import asyncio

import aiohttp

from moriio_proxy.sim import EOS_MARKER, expected_text
from tests.harness.legs import PROMPT, post, prefill_body, prefill_params, sim, words
from tests.harness.waiting import STATE_TIMEOUT, eventually


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
    async with sim("P", defer_timeout=1.0) as p:
        await post(http, p, prefill_body(prefill_params("tx-r")))
        assert p.held_transfers() == 1
        await eventually(lambda: p.held_transfers() == 0)
        assert p.stats.blocks_reaped == 1


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


async def test_plain_request_to_read_decode_is_garbage(http: aiohttp.ClientSession) -> None:
    # vLLM 0.32 only; 0.33 computes the prompt (tests/integration/sim/test_versions.py).
    async with sim("D", mode="READ", vllm_version="0.32") as d:
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


async def test_engine_death_fails_other_inflight_requests(http: aiohttp.ClientSession) -> None:
    async with sim("P", mode="WRITE", token_latency=0.05) as p:
        slow = asyncio.ensure_future(post(http, p, {"prompt": PROMPT, "max_tokens": 50}))
        await eventually(lambda: p.stats.per_rank)  # the engine is generating for it
        bad = prefill_params("tx-z")  # no peer address at all: add_new_req raises
        status, _ = await post(http, p, prefill_body(bad))
        assert status == 500
        status, body = await asyncio.wait_for(slow, STATE_TIMEOUT)
        assert status == 500
        assert body["error"]["message"].startswith("EngineCore died:")
