"""Cache-aware and session-affinity routing: stickiness, the load bound, DP ranks,
membership changes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moriio_proxy.policies import (
    CacheAware,
    LoadBound,
    PolicySettings,
    RoutingContext,
    SessionAffinity,
    Target,
    make_decode_policy,
    make_prefill_policy,
    routing_context,
)
from moriio_proxy.protocol import parse_client_request
from moriio_proxy.registry import Entry
from tests.harness.entries import entry

BLOCK = 16
SETTINGS = PolicySettings(bound=LoadBound(abs_threshold=4, rel_threshold=1.5), block_chars=BLOCK)


def cache_aware(seed: int = 0, settings: PolicySettings = SETTINGS) -> CacheAware:
    policy = make_prefill_policy("cache_aware", settings, random.Random(seed))
    assert isinstance(policy, CacheAware)
    return policy


def session_policy(seed: int = 0) -> SessionAffinity:
    policy = make_prefill_policy("session", SETTINGS, random.Random(seed))
    assert isinstance(policy, SessionAffinity)
    return policy


def text(body: str) -> RoutingContext:
    return RoutingContext(text=body)


def session(name: str | None) -> RoutingContext:
    return RoutingContext(session=name)


def where(target: Target) -> tuple[str, int]:
    return target.entry.instance.http_address, target.rank


PROMPT = "The committee reviewed every proposal in the order it was received. " * 4


# ------------------------------------------------------------------------- load bound


@pytest.mark.parametrize(
    ("load", "least", "exceeded"),
    [
        (4, 0, False),  # within the absolute margin
        (5, 0, True),
        (12, 8, False),  # 4 over: not more than the absolute margin
        (15, 10, False),  # 5 over, but 15 is not more than 1.5 x 10
        (16, 10, True),
    ],
)
def test_load_bound_needs_both_margins(load, least, exceeded):
    assert LoadBound(abs_threshold=4, rel_threshold=1.5).exceeded(load, least) is exceeded


# ------------------------------------------------------------------------ cache aware


def test_a_repeated_prompt_sticks_to_one_instance():
    candidates = [entry(n) for n in range(4)]
    policy = cache_aware()
    first = policy.choose(candidates, text(PROMPT))
    assert all(policy.choose(candidates, text(PROMPT)) == first for _ in range(20))


def test_different_prompts_spread_by_load():
    candidates = [entry(n) for n in range(4)]
    policy = cache_aware()
    picks = Counter(
        where(policy.choose(candidates, text(f"{n:04d} {PROMPT}")))[0] for n in range(40)
    )
    assert len(picks) == 4


def test_the_next_turn_of_a_chat_finds_its_history():
    candidates = [entry(n) for n in range(4)]
    policy = cache_aware(seed=3)
    reads = policy.reads
    history = [{"role": "system", "content": PROMPT}]
    places = set()
    for turn in range(5):
        history = [*history, {"role": "user", "content": f"question {turn} " * 5}]
        request = parse_client_request("chat", {"messages": history})
        target = policy.choose(candidates, routing_context(request, None, reads))
        places.add(where(target))
        history = [*history, {"role": "assistant", "content": f"answer {turn} " * 5}]
    assert len(places) == 1


def test_a_prefix_held_by_several_targets_goes_to_the_least_loaded_of_them():
    a, b, c, d = (entry(n) for n in range(4))
    candidates = [a, b, c, d]
    policy = cache_aware(seed=1)
    shared = PROMPT[: 3 * BLOCK]
    hashes = policy.index.hashes(shared)
    for holder in (a, b):
        policy.index.record(hashes, (*holder.instance.key, 0))
    # Each request shares only the held blocks: ties between a and b go either way...
    picks = Counter(
        where(policy.choose(candidates, text(shared + f"tail {n:03d}" * 4)))[0] for n in range(40)
    )
    assert set(picks) == {a.instance.http_address, b.instance.http_address}
    # ...and a busier holder loses to the idler one.
    a.inflight = [2]
    new = text(shared + "another tail" * 4)
    assert policy.choose(candidates, new).entry is b


def test_an_overloaded_holder_gives_way_to_the_least_loaded():
    holder, idle, quiet = entry(1), entry(2), entry(3, inflight=[1])
    candidates = [holder, idle, quiet]
    policy = cache_aware()
    policy.index.record(policy.index.hashes(PROMPT), (*holder.instance.key, 0))
    holder.inflight = [4]  # 4 over the least loaded: within the margin
    assert policy.choose(candidates, text(PROMPT)).entry is holder
    holder.inflight = [5]  # 5 over and more than 1.5 x 0: too busy
    chosen = policy.choose(candidates, text(PROMPT)).entry
    assert chosen is not holder
    # The prompt is remembered where it went, so it can stick there next time.
    holder.inflight = [50]
    assert policy.choose(candidates, text(PROMPT)).entry is chosen


def test_dp_ranks_are_separate_caches():
    big = entry(1, dp_size=4)
    policy = cache_aware()
    first = policy.choose([big], text(PROMPT))
    big.inflight[first.rank] += 1  # its leg is running
    other = policy.choose([big], text("Something else entirely, " * 4))
    assert other.rank != first.rank  # no match: the least busy rank
    big.inflight[other.rank] += 1
    # Each prompt returns to its own rank, though other ranks are idler.
    for _ in range(5):
        assert policy.choose([big], text(PROMPT)) == first
        assert policy.choose([big], text("Something else entirely, " * 4)) == other
    ranks = {rank for (_, _, rank) in policy.index.targets()}
    assert ranks == {0, 1, 2, 3}


def test_a_holder_that_is_not_a_candidate_is_never_chosen_and_forget_drops_it():
    a, b, c = entry(1), entry(2), entry(3)
    policy = cache_aware()
    assert policy.choose([a], text(PROMPT)).entry is a
    blocks = len(policy.index)
    assert policy.choose([b, c], text(PROMPT)).entry in (b, c)  # a excluded (retry)
    policy.forget(a.instance.key)
    assert all(key[:2] != a.instance.key for key in policy.index.targets())
    assert len(policy.index) == blocks  # the prompt now held by b or c only
    assert policy.choose([a, b, c], text(PROMPT)).entry is not a


def test_prompts_shorter_than_a_block_are_not_indexed():
    policy = cache_aware()
    policy.choose([entry(1), entry(2)], text("short"))
    policy.choose([entry(1), entry(2)], RoutingContext())
    assert len(policy.index) == 0


def test_cache_aware_for_decode_chooses_instances_by_their_total_load():
    busy, idle = entry(1, dp_size=2, role="D"), entry(2, dp_size=2, role="D")
    policy = make_decode_policy("cache_aware", SETTINGS, random.Random(0))
    first = policy.choose([busy, idle], text(PROMPT))
    assert isinstance(first, Entry)
    assert all(policy.choose([busy, idle], text(PROMPT)) is first for _ in range(5))
    first.inflight = [3, 3]  # 6 in flight over the instance's ranks: over the bound
    assert policy.choose([busy, idle], text(PROMPT)) is not first


def test_the_index_stays_within_its_bound_through_the_policy():
    settings = PolicySettings(bound=SETTINGS.bound, block_chars=BLOCK, max_blocks=50)
    policy = cache_aware(settings=settings)
    candidates = [entry(n, dp_size=2) for n in range(3)]
    for n in range(200):
        policy.choose(candidates, text(f"{n:05d}-" * 12))
        assert len(policy.index) <= 50


# ------------------------------------------------------------------- session affinity


def test_a_session_sticks_to_one_target():
    candidates = [entry(n, dp_size=2) for n in range(4)]
    policy = session_policy()
    for name in ("alice", "bob", "conv-17"):
        first = policy.choose(candidates, session(name))
        assert all(policy.choose(candidates, session(name)) == first for _ in range(10))


def test_sessions_spread_evenly_over_instances_and_ranks():
    candidates = [entry(n, dp_size=2) for n in range(4)]
    policy = session_policy()
    owners = Counter(where(policy.owner(candidates, f"session-{i}")) for i in range(4000))
    assert len(owners) == 8
    assert all(350 <= count <= 650 for count in owners.values())  # 500 each on average


@pytest.mark.parametrize("dp_size", [1, 2])
def test_a_joining_instance_takes_only_its_share(dp_size):
    before = [entry(n, dp_size=dp_size) for n in range(4)]
    newcomer = entry(9, dp_size=dp_size)
    policy = session_policy()
    names = [f"s{i}" for i in range(3000)]
    old = {s: policy.owner(before, s) for s in names}
    new = {s: policy.owner([*before, newcomer], s) for s in names}
    moved = [s for s in names if new[s] != old[s]]
    assert all(new[s].entry is newcomer for s in moved)  # nothing shuffles between others
    assert 0.14 <= len(moved) / len(names) <= 0.26  # a fifth of the sessions


def test_a_leaving_instance_moves_only_its_own_sessions():
    candidates = [entry(n, dp_size=2) for n in range(5)]
    leaving = candidates[2]
    policy = session_policy()
    names = [f"s{i}" for i in range(3000)]
    old = {s: policy.owner(candidates, s) for s in names}
    policy.forget(leaving.instance.key)
    remaining = [e for e in candidates if e is not leaving]
    new = {s: policy.owner(remaining, s) for s in names}
    moved = {s for s in names if new[s] != old[s]}
    assert moved == {s for s in names if old[s].entry is leaving}
    assert 0.14 <= len(moved) / len(names) <= 0.26


def test_an_overloaded_owner_gives_way_and_gets_the_session_back_later():
    candidates = [entry(n) for n in range(3)]
    policy = session_policy(seed=5)
    owner = policy.choose(candidates, session("alice")).entry
    owner.inflight = [4]
    assert policy.choose(candidates, session("alice")).entry is owner
    owner.inflight = [5]
    assert policy.choose(candidates, session("alice")).entry is not owner
    owner.inflight = [0]
    assert policy.choose(candidates, session("alice")).entry is owner


def test_no_session_means_least_loaded():
    busy, idle = entry(1, inflight=[3]), entry(2)
    policy = session_policy()
    assert all(policy.choose([busy, idle], session(None)).entry is idle for _ in range(20))


def test_session_for_decode_returns_an_instance():
    candidates = [entry(n, dp_size=4, role="D") for n in range(3)]
    policy = make_decode_policy("session", SETTINGS)
    first = policy.choose(candidates, session("alice"))
    assert isinstance(first, Entry)
    assert all(policy.choose(candidates, session("alice")) is first for _ in range(5))
