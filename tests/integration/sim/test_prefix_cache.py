"""The prefix cache seen from outside: cached tokens in usage where vLLM 0.32 reports them
(``--enable-prompt-tokens-details``; a stream only in its usage chunk), a decode reporting
its prefill's hits, one cache per DP rank, and the engine's accounting of computed tokens."""

from __future__ import annotations

from typing import Any

import aiohttp

from moriio_proxy.sim import chat_prompt_text, expected_text
from tests.harness.legs import (
    post,
    post_sse,
    prefill_body,
    prefill_params,
    sandwich,
    sim,
)

BLOCK = 4
HISTORY = " ".join(f"h{i}" for i in range(30))  # 30 words: 7 full blocks of 4
TURN = HISTORY + " and one more question"  # 34 words, starting with HISTORY


def usage_chunk(events: list[Any]) -> dict[str, Any]:
    chunks = [e for e in events if isinstance(e, dict) and e.get("usage")]
    assert len(chunks) == 1
    usage: dict[str, Any] = chunks[0]["usage"]
    return usage


async def test_completions_report_cached_tokens_and_charge_the_rest(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", block_size=BLOCK, enable_prompt_tokens_details=True) as p:
        _, first = await post(http, p, {"prompt": HISTORY, "max_tokens": 2})
        details = {"cached_tokens": 0, "created_cache_tokens": None, "multimodal_tokens": None}
        assert first["usage"]["prompt_tokens_details"] == details
        assert (p.legs[-1].cached_tokens, p.legs[-1].computed_tokens) == (0, 30)

        _, second = await post(http, p, {"prompt": TURN, "max_tokens": 2})
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 28
        assert second["choices"][0]["text"] == expected_text(TURN, 2)  # same answer
        assert (p.legs[-1].cached_tokens, p.legs[-1].computed_tokens) == (28, 34 - 28)
        assert p.stats.prompt_tokens_computed == 30 + 6
        assert (p.stats.prefix_cache_queries, p.stats.prefix_cache_hits) == (64, 28)

        async with http.get(p.url + "/sim/stats") as r:
            stats = await r.json()
        assert stats["prefix_cache_hits"] == 28 and stats["prefix_cache_queries"] == 64
        assert stats["prefix_cache_blocks"] == [8]  # 7 blocks of HISTORY + 1 more of TURN


async def test_a_stream_reports_cached_tokens_only_in_its_usage_chunk(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", block_size=BLOCK, enable_prompt_tokens_details=True) as p:
        await post(http, p, {"prompt": HISTORY, "max_tokens": 1})
        body = {"prompt": TURN, "max_tokens": 3, "stream": True}
        _, plain = await post_sse(http, p, body)
        assert not any(isinstance(e, dict) and "usage" in e for e in plain)
        body["stream_options"] = {"include_usage": True}
        _, events = await post_sse(http, p, body)
        # TURN's own 8 blocks are cached now; the match stops one token short of all 34.
        assert usage_chunk(events)["prompt_tokens_details"] == {"cached_tokens": 32}


async def test_chat_also_reports_the_tokens_it_cached(http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": HISTORY}, {"role": "user", "content": "hi"}]
    n = len(chat_prompt_text(messages).split())  # 33 words: 8 full blocks
    async with sim("P", block_size=BLOCK, enable_prompt_tokens_details=True) as p:
        path = "/v1/chat/completions"
        _, first = await post(http, p, {"messages": messages, "max_tokens": 1}, path=path)
        assert first["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 0,
            "created_cache_tokens": 32,
            "multimodal_tokens": None,
        }
        body = {"messages": messages, "max_tokens": 1, "stream": True}
        body["stream_options"] = {"include_usage": True}
        _, events = await post_sse(http, p, body, path=path)
        assert usage_chunk(events)["prompt_tokens_details"] == {
            "cached_tokens": 32,
            "created_cache_tokens": 0,
        }
        assert p.legs[-1].computed_tokens == n - 32


async def test_without_the_server_flag_usage_has_no_details_but_the_cache_works(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", block_size=BLOCK) as p:
        await post(http, p, {"prompt": HISTORY, "max_tokens": 1})
        _, body = await post(http, p, {"prompt": TURN, "max_tokens": 1})
        assert body["usage"]["prompt_tokens_details"] is None
        body = {"prompt": TURN, "max_tokens": 1, "stream": True}
        body["stream_options"] = {"include_usage": True}
        _, events = await post_sse(http, p, body)
        assert "prompt_tokens_details" not in usage_chunk(events)
        assert p.stats.prefix_cache_hits == 28 + 32


async def test_a_read_decode_reports_the_prefills_cache_hits(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        sim("P", block_size=BLOCK) as p,
        sim("D", block_size=BLOCK, enable_prompt_tokens_details=True) as d,
    ):
        for prompt, cached in ((HISTORY, 0), (TURN, 28)):
            rid = sandwich(p, d)
            headers = {"X-Request-Id": rid}
            leg = prefill_body(prefill_params(f"tx-{cached}", d), prompt)
            _, pb = await post(http, p, leg, headers)
            kv = pb["kv_transfer_params"]
            assert kv["remote_prefill_cached_tokens"] == cached
            decode = {"prompt": prompt, "max_tokens": 4, "kv_transfer_params": kv}
            _, db = await post(http, d, decode, headers)
            assert db["choices"][0]["text"] == expected_text(prompt, 4)
            assert db["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
            # D computed only the last prompt token; the rest arrived from P.
            assert d.legs[-1].computed_tokens == 1
        assert d.stats.prefix_cache_queries == 0


async def test_each_dp_rank_caches_its_own_prompts(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2, block_size=BLOCK) as p:
        for rank, cached in (("0", 0), ("1", 0), ("0", 28), ("1", 28)):
            headers = {"X-data-parallel-rank": rank}
            prompt = HISTORY if cached == 0 else TURN
            await post(http, p, {"prompt": prompt, "max_tokens": 1}, headers)
            assert p.legs[-1].dp_rank == int(rank)
            assert p.legs[-1].cached_tokens == cached
