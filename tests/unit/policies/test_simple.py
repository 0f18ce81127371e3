"""Choosing P, D and P's DP rank."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moriio_proxy.policies import (
    EMPTY,
    CacheAware,
    LeastLoaded,
    Ranked,
    RankPicker,
    RoundRobin,
    SessionAffinity,
    Target,
    make_decode_policy,
    make_prefill_policy,
)
from moriio_proxy.protocol import Instance
from tests.harness.entries import entry


def test_round_robin_cycles():
    a, b, c = entry(1), entry(2), entry(3)
    policy = RoundRobin()
    assert [policy.choose([a, b, c], EMPTY) for _ in range(7)] == [a, b, c, a, b, c, a]


def test_round_robin_ignores_load():
    busy, idle = entry(1, inflight=[9]), entry(2)
    policy = RoundRobin()
    assert [policy.choose([busy, idle], EMPTY) for _ in range(4)] == [busy, idle, busy, idle]


def test_round_robin_copes_with_a_shrinking_candidate_list():
    a, b, c = entry(1), entry(2), entry(3)
    policy = RoundRobin()
    policy.choose([a, b, c], EMPTY)
    policy.choose([a, b, c], EMPTY)
    assert policy.choose([a], EMPTY) is a


@pytest.mark.parametrize("order", ["busy_first", "idle_first"])
def test_least_loaded_prefers_the_less_loaded_of_two(order):
    busy, idle = entry(1, inflight=[5]), entry(2, inflight=[1])
    candidates = [busy, idle] if order == "busy_first" else [idle, busy]
    policy = LeastLoaded(random.Random(1234))
    assert all(policy.choose(candidates, EMPTY) is idle for _ in range(100))


def test_least_loaded_counts_every_dp_rank():
    # 2 in flight spread over ranks beats 3 on one rank.
    spread, piled = entry(1, dp_size=2, inflight=[1, 1]), entry(2, dp_size=2, inflight=[0, 3])
    policy = LeastLoaded(random.Random(7))
    assert all(policy.choose([piled, spread], EMPTY) is spread for _ in range(50))


def test_least_loaded_never_picks_the_busiest_and_spreads_over_the_rest():
    idle1, idle2, busy = entry(1), entry(2), entry(3, inflight=[4])
    policy = LeastLoaded(random.Random(42))
    candidates = [idle1, idle2, busy]
    picks = Counter(policy.choose(candidates, EMPTY).instance.http_address for _ in range(300))
    assert busy.instance.http_address not in picks
    assert set(picks) == {idle1.instance.http_address, idle2.instance.http_address}


def test_least_loaded_spreads_equal_loads():
    a, b = entry(1), entry(2)
    policy = LeastLoaded(random.Random(3))
    picks = Counter(policy.choose([a, b], EMPTY) is a for _ in range(200))
    assert picks[True] > 0 and picks[False] > 0


def test_least_loaded_single_candidate():
    only = entry(1, inflight=[100])
    assert LeastLoaded(random.Random(0)).choose([only], EMPTY) is only


def test_make_decode_policy():
    assert isinstance(make_decode_policy("round_robin"), RoundRobin)
    assert isinstance(make_decode_policy("least_loaded", rng=random.Random(0)), LeastLoaded)
    assert make_decode_policy("least_loaded").name == "least_loaded"
    assert make_decode_policy("cache_aware").name == "cache_aware"
    assert make_decode_policy("session").name == "session"
    with pytest.raises(ValueError):
        make_decode_policy("random")


def test_make_prefill_policy():
    for name, kind in (("round_robin", Ranked), ("least_loaded", Ranked)):
        policy = make_prefill_policy(name)
        assert isinstance(policy, kind) and policy.name == name
    assert isinstance(make_prefill_policy("cache_aware"), CacheAware)
    assert isinstance(make_prefill_policy("session"), SessionAffinity)
    assert make_prefill_policy("cache_aware").reads == {"text"}
    assert make_prefill_policy("session").reads == {"session"}
    assert make_prefill_policy("least_loaded").reads == set()
    with pytest.raises(ValueError):
        make_prefill_policy("random")


def test_prefill_round_robin_picks_ranks_like_rank_picker():
    # Instances in turn, and on each its least busy rank in rotation, as before.
    a, b = entry(1, dp_size=2), entry(2, dp_size=2)
    policy = make_prefill_policy("round_robin")
    picks = [policy.choose([a, b], EMPTY) for _ in range(4)]
    assert picks == [Target(a, 0), Target(b, 0), Target(a, 1), Target(b, 1)]


def test_rank_picker_spreads_sequential_picks_over_all_ranks():
    picker = RankPicker()
    e = entry(1, dp_size=8)
    picks = [picker.pick(e) for _ in range(16)]
    assert Counter(picks) == dict.fromkeys(range(8), 2)


def test_rank_picker_does_not_alias_across_instances():
    # request_count % dp_size over two DP8 instances reaches only 4 ranks of each.
    picker = RankPicker()
    a, b = entry(1, dp_size=8), entry(2, dp_size=8)
    reached = {"a": set(), "b": set()}
    for _ in range(8):
        reached["a"].add(picker.pick(a))
        reached["b"].add(picker.pick(b))
    assert reached == {"a": set(range(8)), "b": set(range(8))}


def test_rank_picker_prefers_the_least_loaded_rank():
    picker = RankPicker()
    e = entry(1, dp_size=4, inflight=[3, 3, 0, 3])
    assert [picker.pick(e) for _ in range(5)] == [2] * 5
    e.inflight = [2, 1, 2, 2]
    assert picker.pick(e) == 1


def test_rank_picker_with_legs_held_in_flight_fills_idle_ranks_first():
    picker = RankPicker()
    e = entry(1, dp_size=4, inflight=[1, 0, 0, 0])  # something already runs on rank 0
    picks = []
    for _ in range(7):
        rank = picker.pick(e)
        e.inflight[rank] += 1
        picks.append(rank)
    assert sorted(picks[:3]) == [1, 2, 3]  # the idle ranks before the busy one
    assert max(e.inflight) - min(e.inflight) <= 1
    assert sum(e.inflight) == 8


def test_rank_picker_single_rank():
    picker = RankPicker()
    e = entry(1, dp_size=1)
    assert [picker.pick(e) for _ in range(3)] == [0, 0, 0]


def test_rank_picker_picks_are_always_in_range_after_dp_shrinks():
    picker = RankPicker()
    e = entry(1, dp_size=8)
    for _ in range(6):
        picker.pick(e)
    e.instance = Instance(**{**e.instance.__dict__, "dp_size": 2})
    assert {picker.pick(e) for _ in range(10)} == {0, 1}


def test_rank_picker_forget_restarts_rotation():
    picker = RankPicker()
    e = entry(1, dp_size=4)
    assert [picker.pick(e) for _ in range(2)] == [0, 1]
    picker.forget([e.instance.key])
    assert picker.pick(e) == 0
