"""The registry: heartbeat upserts, the transfer-mode invariant, TTL eviction, load counters."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry


def instance(role="P", address="10.0.0.1:20005", mode="READ", dp_size=1, **kw) -> Instance:
    host = address.rpartition(":")[0]
    fields = {
        "kv_host": host,
        "handshake_port": 6301,
        "notify_port": 61005,
        "tp_size": 1,
        **kw,
    }
    return Instance(role=role, http_address=address, dp_size=dp_size, transfer_mode=mode, **fields)


@pytest.fixture
def registry(clock):
    return Registry(ttl=10.0, clock=clock)


def recorder(signal):
    calls = []

    def receive(sender, **kwargs):
        calls.append((sender, kwargs))

    signal.connect(receive, weak=False)
    return calls


# ---------------------------------------------------------------------------- upsert


def test_first_heartbeat_adds(registry, clock):
    p = instance()
    assert registry.upsert(p) == "added"
    [entry] = registry.entries()
    assert entry.instance == p
    assert entry.first_seen == entry.last_seen == clock.now
    assert entry.inflight == [0]
    assert registry.healthy("P") == [entry]
    assert registry.healthy("D") == []
    assert registry.mode == "READ"


def test_identical_heartbeat_refreshes(registry, clock):
    p = instance()
    registry.upsert(p)
    clock.now += 3
    assert registry.upsert(p) == "refreshed"
    [entry] = registry.entries()
    assert entry.last_seen == clock.now
    assert entry.first_seen == clock.now - 3
    assert registry.age(entry) == 3
    assert registry.silence(entry) == 0


def test_changed_heartbeat_updates_in_place_and_keeps_counters(registry):
    registry.upsert(instance(dp_size=2))
    [entry] = registry.entries()
    entry.inflight[1] = 5
    bigger = instance(dp_size=4, notify_port=9999)
    assert registry.upsert(bigger) == "updated"
    assert registry.entries() == [entry]  # same entry object, not a second one
    assert entry.instance == bigger
    assert entry.inflight == [0, 5, 0, 0]


def test_instances_are_keyed_by_role_and_http_address(registry):
    assert registry.upsert(instance("P", "10.0.0.1:20005")) == "added"
    assert registry.upsert(instance("D", "10.0.0.1:20005")) == "added"
    assert registry.upsert(instance("P", "10.0.0.1:20006")) == "added"
    assert len(registry.entries()) == 3
    # Same key with another zmq port is the same instance, re-announced.
    assert registry.upsert(instance("P", "10.0.0.1:20005", handshake_port=1)) == "updated"
    assert len(registry.entries()) == 3


def test_mode_conflict_is_refused_while_the_other_mode_lives(registry, clock):
    registry.upsert(instance("P", mode="READ"))
    write_d = instance("D", "10.0.0.2:40005", mode="WRITE")
    assert registry.upsert(write_d) == "conflict"
    assert registry.healthy("D") == []
    assert registry.mode == "READ"

    # Once the READ instance has gone silent and been swept, WRITE is welcome.
    clock.now += 10.5
    registry.sweep()
    assert registry.upsert(write_d) == "added"
    assert registry.mode == "WRITE"
    assert registry.upsert(instance("P", mode="READ")) == "conflict"


def test_a_lone_instance_may_restart_in_the_other_mode(registry):
    registry.upsert(instance("P", mode="READ"))
    assert registry.upsert(instance("P", mode="WRITE")) == "updated"
    assert registry.mode == "WRITE"


def test_a_restart_in_the_other_mode_is_refused_when_others_disagree(registry):
    registry.upsert(instance("P", mode="READ"))
    registry.upsert(instance("D", "10.0.0.2:40005", mode="READ"))
    assert registry.upsert(instance("P", mode="WRITE")) == "conflict"
    assert registry.entries()[0].instance.transfer_mode == "READ"


def test_pinned_mode_refuses_the_other_mode_even_when_empty(clock):
    registry = Registry(ttl=10.0, pinned_mode="WRITE", clock=clock)
    assert registry.mode == "WRITE"
    assert registry.upsert(instance("P", mode="READ")) == "conflict"
    assert registry.entries() == []
    assert registry.upsert(instance("P", mode="WRITE")) == "added"
    # Pinned: a lone instance may not switch either.
    assert registry.upsert(instance("P", mode="READ")) == "conflict"
    assert registry.entries()[0].instance.transfer_mode == "WRITE"


def test_empty_unpinned_registry_has_no_mode(registry):
    assert registry.mode is None


# ----------------------------------------------------------------------------- sweep


def test_sweep_evicts_only_instances_silent_longer_than_the_ttl(registry, clock):
    removed = recorder(registry.instance_removed)
    registry.upsert(instance("P"))
    registry.upsert(instance("D", "10.0.0.2:40005"))
    clock.now += 8
    registry.upsert(instance("D", "10.0.0.2:40005"))  # D keeps beating, P falls silent
    clock.now += 2  # P silent for exactly the TTL: still alive
    assert registry.sweep() == []
    assert len(registry.healthy("P")) == 1

    clock.now += 0.5
    [gone] = registry.sweep()
    assert gone.instance.role == "P"
    assert [e.instance.role for e in registry.entries()] == ["D"]
    assert removed == [(registry, {"entry": gone, "reason": "heartbeat_timeout"})]
    assert registry.sweep() == []  # evicted once


def test_silent_instance_is_not_routable_even_before_the_sweep(registry, clock):
    registry.upsert(instance("P"))
    clock.now += 10.5
    assert registry.healthy("P") == []


def test_returning_instance_is_re_added(registry, clock):
    added = recorder(registry.instance_added)
    registry.upsert(instance("P"))
    clock.now += 11
    registry.sweep()
    assert registry.upsert(instance("P")) == "added"
    assert len(added) == 2
    assert registry.entries()[0].first_seen == clock.now


def test_static_instances_never_expire(registry, clock):
    registry.upsert(instance("P"), static=True)
    registry.upsert(instance("D", "10.0.0.2:40005"))
    clock.now += 1e6
    swept = registry.sweep()
    assert [e.instance.role for e in swept] == ["D"]
    [entry] = registry.healthy("P")
    assert entry.static


def test_signals_fire_with_the_entry(registry):
    added = recorder(registry.instance_added)
    removed = recorder(registry.instance_removed)
    registry.upsert(instance("P"))
    [entry] = registry.entries()
    assert added == [(registry, {"entry": entry})]
    registry.upsert(instance("P"))  # a refresh is not an addition
    assert len(added) == 1
    assert registry.remove(entry.instance.key, "admin") is entry
    assert removed == [(registry, {"entry": entry, "reason": "admin"})]
    assert registry.remove(entry.instance.key, "admin") is None
    assert len(removed) == 1


def test_signals_are_per_registry(clock):
    first, second = Registry(10.0, clock=clock), Registry(10.0, clock=clock)
    heard = recorder(first.instance_added)
    second.upsert(instance())
    assert heard == []


def test_healthy_keeps_registration_order(registry):
    addresses = [f"10.0.0.{i}:20005" for i in (5, 1, 3)]
    for address in addresses:
        registry.upsert(instance("P", address))
    assert [e.instance.http_address for e in registry.healthy("P")] == addresses


# ----------------------------------------------------------------------------- track


def test_track_counts_per_dp_rank(registry):
    registry.upsert(instance(dp_size=4))
    [entry] = registry.entries()
    with registry.track(entry, 2):
        assert entry.inflight == [0, 0, 1, 0]
        with registry.track(entry, 2), registry.track(entry, 0):
            assert entry.inflight == [1, 0, 2, 0]
            assert entry.total_inflight == 3
        assert entry.inflight == [0, 0, 1, 0]
    assert entry.inflight == [0, 0, 0, 0]


def test_track_goes_back_to_zero_on_exceptions(registry):
    registry.upsert(instance(dp_size=2))
    [entry] = registry.entries()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), registry.track(entry, 1):
        raise Boom
    assert entry.inflight == [0, 0]

    # Cancellation (a BaseException) too.
    import asyncio

    with pytest.raises(asyncio.CancelledError), registry.track(entry):
        raise asyncio.CancelledError
    assert entry.inflight == [0, 0]


def test_track_survives_an_update_that_shrinks_dp(registry):
    registry.upsert(instance(dp_size=4))
    [entry] = registry.entries()
    with registry.track(entry, 3):
        registry.upsert(replace(entry.instance, dp_size=1))
    assert entry.inflight == [0, 0, 0, 0]
    assert entry.instance.dp_size == 1


# ------------------------------------------------------------------------ outlier ejection


def ejecting(clock, after=3, seconds=30.0):
    return Registry(10.0, eject_after=after, eject_seconds=seconds, clock=clock)


def test_consecutive_failures_eject_while_heartbeats_continue(clock):
    registry = ejecting(clock)
    registry.upsert(instance("P", "10.0.0.1:1"))
    registry.upsert(instance("P", "10.0.0.2:1"))
    bad, good = registry.entries()
    assert not registry.report_failure(bad)
    assert not registry.report_failure(bad)
    assert registry.report_failure(bad)
    assert registry.is_ejected(bad)
    registry.upsert(bad.instance)  # a heartbeat does not make it healthy again
    assert registry.routable("P") == [good]
    assert registry.healthy("P") == [bad, good]  # still registered and alive


def test_a_success_resets_the_failure_count(clock):
    registry = ejecting(clock)
    registry.upsert(instance("P"))
    (entry,) = registry.entries()
    registry.report_failure(entry)
    registry.report_failure(entry)
    registry.report_success(entry)
    assert not registry.report_failure(entry)
    assert registry.routable("P") == [entry]


def test_ejected_instance_returns_after_the_cooling_period_on_probation(clock):
    registry = ejecting(clock, seconds=30.0)
    registry.upsert(instance("P", "10.0.0.1:1"))
    registry.upsert(instance("P", "10.0.0.2:1"))
    bad, good = registry.entries()
    for _ in range(3):
        registry.report_failure(bad)
    clock.now += 29.0
    registry.upsert(bad.instance)
    registry.upsert(good.instance)
    assert registry.routable("P") == [good]
    clock.now += 2.0
    assert registry.routable("P") == [bad, good]
    # One more failure on probation ejects it again at once.
    assert registry.report_failure(bad)
    assert registry.routable("P") == [good]


def test_when_every_instance_is_ejected_all_are_tried(clock):
    registry = ejecting(clock, after=1)
    registry.upsert(instance("D", "10.0.0.1:1"))
    (entry,) = registry.entries()
    assert registry.report_failure(entry)
    assert registry.is_ejected(entry)
    assert registry.routable("D") == [entry]


def test_ejection_disabled_with_zero(clock):
    registry = ejecting(clock, after=0)
    registry.upsert(instance("P"))
    (entry,) = registry.entries()
    for _ in range(10):
        assert not registry.report_failure(entry)
    assert not registry.is_ejected(entry)
