"""The registry snapshot a supervisor publishes and its workers apply (no sockets)."""

from __future__ import annotations

import msgpack

from moriio_proxy.admin.actions import parse_action
from moriio_proxy.discovery.mirror import (
    Acknowledgements,
    MirrorSource,
    apply_snapshot,
    encode_snapshot,
    fleet_inflight_of,
    local_inflight,
    sum_reports,
)
from moriio_proxy.metrics import Metrics
from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry
from tests.harness.clock import ManualClock


def instance(role: str, address: str, mode: str = "READ", dp: int = 1) -> Instance:
    host = address.split(":")[0]
    return Instance(role, address, host, 6301, 6105, dp, 1, mode)  # type: ignore[arg-type]


def mirrored(source: Registry, fleet: dict | None = None) -> Registry:
    replica = Registry(10.0, clock=source.clock)
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, fleet or {}), raw=False))
    return replica


def test_a_worker_sees_the_supervisors_instances_ages_and_silences():
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("P", "10.0.0.1:20005", dp=2))
    source.upsert(instance("D", "10.0.0.2:40005"), static=True)
    clock.now += 4.0
    source.upsert(instance("P", "10.0.0.1:20005", dp=2))  # a heartbeat
    clock.now += 1.5
    replica = mirrored(source)
    assert [e.instance for e in replica.entries()] == [e.instance for e in source.entries()]
    p, d = replica.entries()
    assert replica.silence(p) == 1.5 and replica.age(p) == 5.5
    assert d.static and not p.static
    clock.now += 20  # the replica never evicts by itself: the supervisor decides
    assert replica.sweep() == [p]  # ...unless asked, as a plain registry would


def test_instances_gone_from_the_snapshot_leave_the_worker():
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("P", "10.0.0.1:20005"))
    source.upsert(instance("D", "10.0.0.2:40005"))
    replica = mirrored(source)
    source.remove(("D", "10.0.0.2:40005"), "test")
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    assert [e.instance.role for e in replica.entries()] == ["P"]


def test_a_fleet_that_changed_mode_is_taken_in_one_snapshot():
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("P", "10.0.0.1:20005", mode="READ"))
    replica = mirrored(source)
    source.remove(("P", "10.0.0.1:20005"), "evicted")
    source.upsert(instance("P", "10.0.0.3:20005", mode="WRITE"))
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    assert [e.instance.http_address for e in replica.entries()] == ["10.0.0.3:20005"]
    assert replica.mode == "WRITE"


def test_fleet_inflight_is_the_sum_of_the_workers_reports():
    clock = ManualClock()
    worker_a, worker_b = Registry(10.0, clock=clock), Registry(10.0, clock=clock)
    for registry in (worker_a, worker_b):
        registry.upsert(instance("P", "10.0.0.1:20005", dp=2))
        registry.upsert(instance("D", "10.0.0.2:40005"))
    worker_a.entries()[0].inflight[1] += 2
    worker_b.entries()[0].inflight[0] += 1
    worker_b.entries()[1].inflight[0] += 3
    fleet = sum_reports({0: local_inflight(worker_a), 1: local_inflight(worker_b)})
    assert fleet == {("P", "10.0.0.1:20005"): [1, 2], ("D", "10.0.0.2:40005"): [3]}
    supervisor = Registry(10.0, clock=clock)
    supervisor.upsert(instance("P", "10.0.0.1:20005", dp=2))
    supervisor.upsert(instance("D", "10.0.0.2:40005"))
    replica = mirrored(supervisor, fleet)
    p, d = replica.entries()
    assert fleet_inflight_of(p) == (1, 2) and fleet_inflight_of(d) == (3,)
    assert p.inflight == [0, 0]  # routing still reads this worker's own load
    assert fleet_inflight_of(supervisor.entries()[0]) == (0, 0)  # one process: its own


def test_an_idle_worker_reports_nothing():
    registry = Registry(10.0)
    registry.upsert(instance("P", "10.0.0.1:20005"))
    assert local_inflight(registry) == {}


def test_a_drain_and_an_operators_ejection_reach_the_workers():
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("D", "10.0.0.2:40005"))
    source.upsert(instance("D", "10.0.0.3:40005"))
    replica = mirrored(source)
    drained, ejected = source.entries()
    drained.draining = True
    source.eject(ejected, 5.0)
    clock.now += 1.0  # the snapshot says "4 s more", whenever the worker applies it
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    mine = {e.instance.http_address: e for e in replica.entries()}
    assert mine["10.0.0.2:40005"].draining and not mine["10.0.0.3:40005"].draining
    assert replica.is_ejected(mine["10.0.0.3:40005"])
    assert replica.routable("D") == [mine["10.0.0.3:40005"]]  # panic, among the undrained
    clock.now += 4.1
    assert not replica.is_ejected(mine["10.0.0.3:40005"])
    drained.draining = False  # undrain
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    assert not mine["10.0.0.2:40005"].draining


def test_a_workers_own_ejection_outlives_a_snapshot():
    """A worker ejects on its own failed legs; a snapshot without an operator's ejection
    does not undo that."""
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("D", "10.0.0.2:40005"))
    replica = mirrored(source)
    (entry,) = replica.entries()
    replica.eject(entry, 30.0)
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    assert replica.is_ejected(entry)


def test_a_forwarded_action_is_applied_and_acknowledged_in_the_snapshots():
    clock = ManualClock()
    source = Registry(10.0, clock=clock)
    source.upsert(instance("D", "10.0.0.2:40005"))
    acks = Acknowledgements(source)
    acks.apply({"id": "a1", "action": "drain",
                "body": {"role": "D", "http_address": "10.0.0.2:40005"}})  # fmt: skip
    acks.apply({"id": "a2", "action": "drain", "body": {"role": "D"}})
    snapshot = msgpack.unpackb(encode_snapshot(source, {}, acks.recent), raw=False)
    assert snapshot["entries"][0]["draining"] is True
    assert snapshot["acks"]["a1"]["status"] == 200
    assert snapshot["acks"]["a2"] == {
        "status": 400,
        "message": "http_address must be a string such as '10.0.0.2:8200'",
        "role": "",
        "http_address": "",
    }
    for n in range(100):  # only the latest are repeated
        acks.apply({"id": f"x{n}", "action": "undrain", "body": {}})
    assert len(acks.recent) == 64 and "a1" not in acks.recent and "x99" in acks.recent


async def test_a_worker_cut_off_from_its_supervisor_says_the_action_is_unconfirmed():
    source = MirrorSource(
        Registry(10.0),
        Metrics(),
        snapshots="ipc:///nonexistent/s",
        reports="ipc:///nonexistent/r",
        worker=0,
        on_orphaned=lambda: None,
    )
    action = parse_action("drain", {"role": "D", "http_address": "10.0.0.2:40005"})
    outcome = await source.administer(action)  # never started: no socket to forward on
    assert outcome.status == 503
    assert outcome.message == (
        "the supervisor did not confirm within 5s; the action may still apply: see "
        "GET /admin/instances"
    )
