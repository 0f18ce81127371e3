"""READ mode by hand: the decode pulls the prefill's blocks over the real notify ports, and
every way a leg can be wrong ends as vLLM 0.32 ends it (garbage text or a dead engine)."""

from __future__ import annotations

import aiohttp

from moriio_proxy.sim import expected_text
from tests.harness.legs import PROMPT, post, prefill_body, prefill_params, sandwich, sim
from tests.harness.waiting import eventually


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
        await eventually(lambda: p.held_transfers() == 0)  # the release notify frees them


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
