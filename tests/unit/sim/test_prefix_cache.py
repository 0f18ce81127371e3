"""A DP rank's prefix cache: chained block keys, longest-prefix matches capped one token
short, LRU eviction within a block budget, tails evicted before heads; and how the model
runner charges a request for what the cache does not hold."""

from __future__ import annotations

import asyncio

import pytest

from moriio_proxy.sim.engine.memory import BlockAllocator, DpRank
from moriio_proxy.sim.engine.prefix_cache import PrefixCache
from moriio_proxy.sim.engine.request import EngineRequest
from moriio_proxy.sim.engine.runner import ModelRunner
from moriio_proxy.sim.model import Stopping
from moriio_proxy.sim.settings import LegRecord, SimConfig, SimStats


def tokens(n: int, start: int = 0) -> list[str]:
    return [f"w{i}" for i in range(start, start + n)]


def test_keys_cover_full_blocks_only_and_chain_the_prefix() -> None:
    cache = PrefixCache(block_size=4, capacity=100)
    keys = cache.keys(tokens(11))
    assert len(keys) == 2  # 11 tokens: two full blocks, the partial third has no key
    assert cache.keys(tokens(8)) == keys  # a prompt's keys are a prefix of its extension's
    assert cache.keys(tokens(12))[:2] == keys
    # The same four tokens after a different first block are a different block.
    other = cache.keys(["x", "y", "z", "q", *tokens(4, 4)])
    assert other[1] != keys[1]
    assert cache.keys(tokens(3)) == []


def test_match_finds_the_longest_cached_prefix_and_leaves_one_token_to_compute() -> None:
    cache = PrefixCache(block_size=4, capacity=100)
    prompt = tokens(12)
    keys = cache.keys(prompt)
    assert cache.match(keys, 12) == 0
    cache.insert(keys)
    # All three blocks are cached, but the last token is always computed: (12-1)//4 = 2.
    assert cache.match(keys, 12) == 8
    longer = tokens(20)
    assert cache.match(cache.keys(longer), 20) == 12  # the whole cached prefix
    diverging = [*tokens(6), "other", *tokens(13, 7)]
    assert cache.match(cache.keys(diverging), 20) == 4  # stops at the first differing block


def test_a_missing_block_ends_the_match_even_if_later_blocks_are_cached() -> None:
    cache = PrefixCache(block_size=2, capacity=100)
    keys = cache.keys(tokens(10))
    cache.insert([keys[0], keys[2], keys[3]])
    assert cache.match(keys, 10) == 2


def test_capacity_bounds_the_blocks_and_evicts_least_recently_used() -> None:
    cache = PrefixCache(block_size=2, capacity=6)
    a, b, c = (cache.keys(tokens(6, start)) for start in (0, 100, 200))  # 3 blocks each
    assert cache.insert(a) == 0 and cache.insert(b) == 0
    assert len(cache) == 6
    cache.insert(a)  # a is touched: b is now the least recently used
    assert cache.insert(c) == 3
    assert len(cache) == 6
    assert all(k in cache for k in a + c) and not any(k in cache for k in b)
    for start in range(300, 1300, 6):  # the bound holds whatever is inserted
        cache.insert(cache.keys(tokens(6, start)))
        assert len(cache) <= 6


def test_a_prompt_loses_its_tail_before_its_head() -> None:
    cache = PrefixCache(block_size=2, capacity=4)
    a = cache.keys(tokens(6))  # 3 blocks
    cache.insert(a)
    cache.insert(cache.keys(tokens(4, 100)))  # 2 new blocks: one of a's must go
    assert a[0] in cache and a[1] in cache and a[2] not in cache
    assert cache.match(a, 7) == 4  # what is left is still a usable prefix


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        PrefixCache(block_size=0, capacity=1)
    with pytest.raises(ValueError):
        PrefixCache(block_size=16, capacity=0)


def _runner(
    role: str = "P", mode: str = "READ", dp_size: int = 1, prefill_token_latency: float = 0.0
) -> ModelRunner:
    config = SimConfig(
        role=role,
        mode=mode,
        dp_size=dp_size,
        block_size=4,
        prefill_token_latency=prefill_token_latency,
    )
    blocks = BlockAllocator(config.block_size)
    ranks = [DpRank(r, blocks, cache=PrefixCache(4, 1000)) for r in range(dp_size)]
    return ModelRunner(config, SimStats(), "test", ranks)


def _request(words: list[str], rank: int = 0, kv: dict[str, object] | None = None) -> EngineRequest:
    rec = LegRecord(path="/v1/completions", headers={})
    return EngineRequest(0, 0, words, "req", rank, 1, Stopping(), kv, rec)


def test_only_uncached_tokens_are_charged_and_counted() -> None:
    runner = _runner()
    st = runner.ranks[0]
    first, second = _request(tokens(18)), _request(tokens(26))
    assert runner.account_prompt(first, st) == 18
    assert (first.cached_tokens, first.created_cache_tokens) == (0, 16)
    assert runner.account_prompt(second, st) == 26 - 16
    assert (second.cached_tokens, second.created_cache_tokens) == (16, 8)
    assert second.rec.cached_tokens == 16 and second.rec.computed_tokens == 10
    stats = runner.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (44, 16)
    assert stats.prompt_tokens_computed == 28


def test_each_dp_rank_has_its_own_cache() -> None:
    runner = _runner(dp_size=2)
    ranks = runner.ranks
    runner.account_prompt(_request(tokens(20), rank=0), ranks[0])
    assert runner.account_prompt(_request(tokens(20), rank=1), ranks[1]) == 20
    assert runner.account_prompt(_request(tokens(20), rank=0), ranks[0]) == 4


def test_disabled_prefix_caching_computes_every_token() -> None:
    runner = _runner()
    st = runner.ranks[0]
    st.cache = None
    for _ in range(2):
        assert runner.account_prompt(_request(tokens(20)), st) == 20
    assert runner.stats.prefix_cache_queries == 0


@pytest.mark.parametrize(
    ("mode", "remote", "cached", "computed"),
    [("READ", 7, 7, 1), ("READ", None, 19, 1), ("WRITE", None, 20, 0), ("READ", True, 19, 1)],
)
def test_a_decode_leg_reports_the_prefills_hits_and_computes_what_did_not_arrive(
    mode: str, remote: object, cached: int, computed: int
) -> None:
    runner = _runner(role="D", mode=mode)
    kv: dict[str, object] = {"do_remote_prefill": True}
    if remote is not None:
        kv["remote_prefill_cached_tokens"] = remote
    req = _request(tokens(20), kv=kv)
    assert runner.account_prompt(req, runner.ranks[0]) == computed
    assert req.cached_tokens == cached
    assert runner.stats.prefix_cache_queries == 0  # its prompt came from P


async def test_a_rank_computes_prompts_one_after_another() -> None:
    runner = _runner(prefill_token_latency=10.0)
    st = runner.ranks[0]
    first = asyncio.ensure_future(runner.compute_prompt(_request(tokens(3))))
    await asyncio.sleep(0)
    queued_until = st.compute_free_at
    second = asyncio.ensure_future(runner.compute_prompt(_request(tokens(2, 50))))
    await asyncio.sleep(0)
    try:
        # 2 tokens at 10 s each, scheduled after the first prompt's 3, not beside them.
        assert st.compute_free_at == pytest.approx(queued_until + 20.0)
        assert runner.stats.prompt_tokens_computed == 5
    finally:
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
