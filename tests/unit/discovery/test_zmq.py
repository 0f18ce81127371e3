"""Discovery.accept: judging one ZMQ ROUTER message without sockets.

The listener is the proxy's only unauthenticated network input: whatever arrives, accept()
must count it, never raise, and keep accepting good heartbeats afterwards.
"""

from __future__ import annotations

import ipaddress
import logging

import msgpack
import pytest

from moriio_proxy.discovery import Discovery
from moriio_proxy.metrics import Metrics
from moriio_proxy.registry import Registry
from tests.harness.clock import ManualClock

IDENTITY = b"\x00\x8bEg\x01"

P_READ = {
    "type": "P",
    "http_address": "10.0.0.1:20005",
    "zmq_address": "host:10.0.0.1,handshake:6301,notify:61005",
    "dp_size": 8,
    "tp_size": 1,
    "transfer_mode": "READ",
}
D_READ = {
    **P_READ,
    "type": "D",
    "http_address": "10.0.0.2:40005",
    "zmq_address": "host:10.0.0.2,handshake:7301,notify:7501",
    "dp_size": 1,
}


def make(allow=(), pinned_mode=None):
    registry = Registry(ttl=10.0, pinned_mode=pinned_mode, clock=ManualClock())
    metrics = Metrics()
    discovery = Discovery(registry, metrics, host="127.0.0.1", port=0, allow=allow)
    return discovery, registry, metrics


def frames(message) -> list[bytes]:
    return [IDENTITY, msgpack.packb(message)]


def rejected(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "moriio_proxy_registrations_rejected_total", {"reason": reason}
    )
    return value or 0.0


def accepted(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "moriio_proxy_registrations_total", {"result": result}
    )
    return value or 0.0


def test_valid_heartbeat_is_added_then_refreshed():
    discovery, registry, metrics = make()
    assert discovery.accept(frames(P_READ), "10.0.0.1") == "added"
    [entry] = registry.healthy("P")
    assert entry.instance.http_address == "10.0.0.1:20005"
    assert entry.instance.dp_size == 8
    assert discovery.accept(frames(P_READ), "10.0.0.1") == "refreshed"
    assert discovery.accept(frames({**P_READ, "dp_size": 4}), "10.0.0.1") == "updated"
    assert accepted(metrics, "added") == 1
    assert accepted(metrics, "refreshed") == 1
    assert accepted(metrics, "updated") == 1
    assert len(registry.entries()) == 1


def test_old_register_shape_is_accepted():
    discovery, registry, _ = make()
    gen1 = {
        "type": "register",
        "role": "D",
        "index": "1",
        "request_address": "http://10.0.0.2:40005/v1/completions",
        "handshake_port": 7301,
        "notify_port": 7501,
        "dp_size": 1,
        "tp_size": 1,
        "transfer_mode": "READ",
    }
    assert discovery.accept(frames(gen1)) == "added"
    assert discovery.accept(frames(D_READ)) == "refreshed"  # the same instance
    assert len(registry.healthy("D")) == 1


def test_a_late_proxy_absorbs_a_backlog_of_identical_heartbeats():
    discovery, registry, metrics = make()
    results = [discovery.accept(frames(P_READ)) for _ in range(1000)]
    assert results.count("added") == 1
    assert results.count("refreshed") == 999
    assert len(registry.entries()) == 1
    assert accepted(metrics, "refreshed") == 999


@pytest.mark.parametrize(
    "message",
    [
        [],
        [msgpack.packb(P_READ)],
        [IDENTITY, msgpack.packb(P_READ), b""],
        [IDENTITY, b"", msgpack.packb(P_READ)],
    ],
)
def test_wrong_frame_counts_are_rejected(message):
    discovery, registry, metrics = make()
    assert discovery.accept(message) == "bad_frames"
    assert rejected(metrics, "bad_frames") == 1
    assert registry.entries() == []


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used by msgpack
        b"\xff\xfe garbage \x00",
        msgpack.packb(P_READ)[:-5],  # truncated
        msgpack.packb(P_READ) + b"\x01",  # trailing bytes
        b"\x92\x01",  # an array that promises 2 items and holds 1
        b"\xdd\xff\xff\xff\xff",  # an array that claims 4 billion items
    ],
)
def test_garbage_bytes_are_rejected(payload):
    discovery, registry, metrics = make()
    assert discovery.accept([IDENTITY, payload]) == "bad_msgpack"
    assert rejected(metrics, "bad_msgpack") == 1
    assert registry.entries() == []


@pytest.mark.parametrize("message", [[P_READ], ["P", "D"], 42, "P", None, True, 1.5])
def test_msgpack_that_is_not_a_map_is_rejected(message):
    discovery, registry, metrics = make()
    assert discovery.accept(frames(message)) == "not_a_map"
    assert rejected(metrics, "not_a_map") == 1
    assert registry.entries() == []


def test_unknown_type_is_rejected():
    discovery, _, metrics = make()
    assert discovery.accept(frames({**P_READ, "type": "HELLO"})) == "unknown_type"
    assert discovery.accept(frames({"no": "type"})) == "unknown_type"
    assert rejected(metrics, "unknown_type") == 2


def test_wrong_field_types_are_rejected():
    discovery, registry, metrics = make()
    assert discovery.accept(frames({**P_READ, "dp_size": "many"})) == "bad_field"
    assert discovery.accept(frames({**P_READ, "dp_size": True})) == "bad_field"
    assert discovery.accept(frames({**P_READ, "http_address": 20005})) == "bad_field"
    assert discovery.accept(frames({**P_READ, "http_address": "10.0.0.1"})) == "bad_address"
    assert rejected(metrics, "bad_field") == 3
    assert rejected(metrics, "bad_address") == 1
    assert registry.entries() == []


def test_non_string_map_keys_are_rejected_not_fatal():
    discovery, _, metrics = make()
    assert discovery.accept(frames({1: 2, 3: "P"})) == "unknown_type"
    # An array as a map key cannot become a dict key at all.
    assert discovery.accept(frames({(1, 2): 3})) == "bad_msgpack"
    assert rejected(metrics, "unknown_type") == 1
    assert rejected(metrics, "bad_msgpack") == 1


def test_one_megabyte_frames_are_rejected_and_discovery_carries_on():
    discovery, registry, metrics = make()
    huge_field = {**P_READ, "http_address": "1" * (1 << 20) + ":20005"}
    assert discovery.accept(frames(huge_field)) == "bad_field"
    assert discovery.accept([IDENTITY, b"\x00" * (1 << 20)]) == "bad_msgpack"
    assert discovery.accept(frames(list(range(1 << 18)))) == "not_a_map"
    assert registry.entries() == []
    assert discovery.accept(frames(P_READ)) == "added"
    assert rejected(metrics, "bad_field") == 1
    assert rejected(metrics, "bad_msgpack") == 1
    assert rejected(metrics, "not_a_map") == 1


def test_mode_conflict_is_refused_and_counted():
    discovery, registry, metrics = make()
    assert discovery.accept(frames(P_READ)) == "added"
    write_d = {**D_READ, "transfer_mode": "WRITE"}
    assert discovery.accept(frames(write_d)) == "conflict"
    assert discovery.accept(frames(write_d)) == "conflict"
    assert rejected(metrics, "mode_conflict") == 2
    assert accepted(metrics, "added") == 1  # a conflict is not an accepted registration
    assert registry.healthy("D") == []
    assert registry.mode == "READ"
    assert discovery.accept(frames(D_READ)) == "added"


def test_pinned_mode_conflict_is_refused():
    discovery, registry, metrics = make(pinned_mode="WRITE")
    assert discovery.accept(frames(P_READ)) == "conflict"
    assert rejected(metrics, "mode_conflict") == 1
    assert registry.entries() == []


def test_conflict_is_logged_loudly(caplog):
    discovery, _, _ = make()
    discovery.accept(frames(P_READ))
    with caplog.at_level(logging.ERROR, logger="moriio_proxy.discovery"):
        discovery.accept(frames({**D_READ, "transfer_mode": "WRITE"}))
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "REFUSED" in record.getMessage()
    assert "10.0.0.2:40005" in record.getMessage()


def test_rejection_logs_are_rate_limited(caplog):
    discovery, _, metrics = make()
    with caplog.at_level(logging.WARNING, logger="moriio_proxy.discovery"):
        for _ in range(500):
            discovery.accept([IDENTITY, b"\xc1"])
    assert rejected(metrics, "bad_msgpack") == 500  # every one is counted
    assert len(caplog.records) == 1  # but not every one is logged


ALLOW = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("peer", ["192.168.1.5", "11.0.0.1", "fe80::1", None, "", "not-an-ip"])
def test_allow_list_rejects_peers_outside_the_networks(peer):
    discovery, registry, metrics = make(allow=ALLOW)
    assert discovery.accept(frames(P_READ), peer) == "not_allowed"
    assert rejected(metrics, "not_allowed") == 1
    assert registry.entries() == []


@pytest.mark.parametrize("peer", ["10.0.0.1", "10.255.0.7", "::ffff:10.1.2.3", "fd00::5"])
def test_allow_list_accepts_peers_inside_the_networks(peer):
    discovery, registry, _ = make(allow=ALLOW)
    assert discovery.accept(frames(P_READ), peer) == "added"
    assert len(registry.entries()) == 1


def test_allow_list_is_checked_before_the_payload_is_parsed():
    discovery, _, metrics = make(allow=ALLOW)
    assert discovery.accept([IDENTITY, b"\xc1"], "192.168.1.5") == "not_allowed"
    assert rejected(metrics, "bad_msgpack") == 0


def test_without_allow_list_any_peer_may_register():
    discovery, _, _ = make()
    assert discovery.accept(frames(P_READ), None) == "added"
    assert discovery.accept(frames(D_READ), "203.0.113.9") == "added"


def test_an_internal_failure_is_counted_not_raised():
    def broken_clock() -> float:
        raise RuntimeError("clock gone")

    metrics = Metrics()
    discovery = Discovery(Registry(ttl=10.0, clock=broken_clock), metrics, host="127.0.0.1", port=0)
    assert discovery.accept(frames(P_READ)) == "internal_error"
    assert rejected(metrics, "internal_error") == 1
