"""``protocol.registration``: heartbeat maps of both shapes into an Instance, and the
reasons anything a vLLM would not send is refused for.
"""

from __future__ import annotations

import pytest

from moriio_proxy.protocol import (
    RegistrationError,
    parse_registration,
)
from tests.harness.wire import P_HEARTBEAT, D, P

# The two registration shapes: vLLM 0.32/0.33's heartbeat and the older "register".
GEN2 = P_HEARTBEAT
GEN1 = {
    "type": "register",
    "role": "P",
    "index": "7",
    "request_address": "http://10.0.0.1:20005/v1/completions",
    "handshake_port": 6301,
    "notify_port": 61005,
    "dp_size": 8,
    "tp_size": 2,
    "transfer_mode": "READ",
}


def test_vllm_032_registration_becomes_an_instance():
    instance = parse_registration(GEN2)
    assert instance == P
    assert instance.key == ("P", "10.0.0.1:20005")
    assert instance.base_url == "http://10.0.0.1:20005"
    assert instance.zmq_address == GEN2["zmq_address"]


def test_both_registration_shapes_normalise_to_the_same_instance():
    assert parse_registration(GEN1) == parse_registration(GEN2)
    # index is ignored
    assert parse_registration({**GEN1, "index": "99"}) == parse_registration(GEN2)


def test_gen1_decode_registration_without_path():
    message = {**GEN1, "role": "D", "request_address": "10.0.0.2:40005"}
    instance = parse_registration(message)
    assert instance.role == "D"
    assert instance.http_address == "10.0.0.2:40005"
    assert instance.kv_host == "10.0.0.2"


def test_an_instance_round_trips_through_its_heartbeat_shape():
    for instance in (P, D):
        heartbeat = {
            "type": instance.role,
            "http_address": instance.http_address,
            "zmq_address": instance.zmq_address,
            "dp_size": instance.dp_size,
            "tp_size": instance.tp_size,
            "transfer_mode": instance.transfer_mode,
        }
        assert parse_registration(heartbeat) == instance


def test_transfer_mode_is_case_insensitive():
    assert parse_registration({**GEN2, "transfer_mode": "write"}).transfer_mode == "WRITE"


def test_gen1_ipv6_request_address():
    instance = parse_registration({**GEN1, "request_address": "http://[::1]:20005/v1/completions"})
    assert instance.kv_host == "::1"
    assert instance.base_url == "http://[::1]:20005"


HUGE = "1" * 1_000_000


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([GEN2], "not_a_map"),
        (42, "not_a_map"),
        ("P", "not_a_map"),
        (None, "not_a_map"),
        (b"\x81", "not_a_map"),
        ({}, "unknown_type"),
        ({**GEN2, "type": "X"}, "unknown_type"),
        ({**GEN2, "type": "p"}, "unknown_type"),
        ({**GEN2, "type": 1}, "unknown_type"),
        # wrong field types
        ({**GEN2, "http_address": 20005}, "bad_field"),
        ({**GEN2, "http_address": ["10.0.0.1:20005"]}, "bad_field"),
        ({**GEN2, "zmq_address": {"host": "10.0.0.1"}}, "bad_field"),
        ({**GEN2, "dp_size": "eight"}, "bad_field"),
        ({**GEN2, "dp_size": 1.5}, "bad_field"),
        ({**GEN2, "dp_size": None}, "bad_field"),
        ({**GEN2, "tp_size": [1]}, "bad_field"),
        ({**GEN2, "transfer_mode": 1}, "bad_field"),
        ({**GEN2, "transfer_mode": "BOTH"}, "bad_field"),
        # bools are not integers
        ({**GEN2, "dp_size": True}, "bad_field"),
        ({**GEN2, "tp_size": False}, "bad_field"),
        ({**GEN1, "handshake_port": True}, "bad_address"),
        # out of range sizes
        ({**GEN2, "dp_size": 0}, "bad_field"),
        ({**GEN2, "tp_size": -1}, "bad_field"),
        ({**GEN2, "dp_size": 10**9}, "bad_field"),
        # missing fields
        ({k: v for k, v in GEN2.items() if k != "http_address"}, "bad_field"),
        ({k: v for k, v in GEN2.items() if k != "zmq_address"}, "bad_field"),
        ({k: v for k, v in GEN2.items() if k != "transfer_mode"}, "bad_field"),
        ({**GEN2, "http_address": ""}, "bad_field"),
        ({**GEN2, "zmq_address": "host:10.0.0.1,handshake:6301"}, "bad_address"),
        ({**GEN2, "zmq_address": "handshake:6301,notify:61005"}, "bad_address"),
        ({**GEN2, "zmq_address": "host:,handshake:6301,notify:61005"}, "bad_address"),
        ({k: v for k, v in GEN1.items() if k != "role"}, "bad_field"),
        ({k: v for k, v in GEN1.items() if k != "request_address"}, "bad_field"),
        ({k: v for k, v in GEN1.items() if k != "notify_port"}, "bad_address"),
        # bad ports and addresses
        ({**GEN2, "http_address": "10.0.0.1"}, "bad_address"),
        ({**GEN2, "http_address": ":20005"}, "bad_address"),
        ({**GEN2, "http_address": "10.0.0.1:0"}, "bad_address"),
        ({**GEN2, "http_address": "10.0.0.1:65536"}, "bad_address"),
        ({**GEN2, "http_address": "10.0.0.1:http"}, "bad_address"),
        # A host is pasted into URLs and the request-id sandwich: nothing that changes them.
        ({**GEN2, "http_address": "evil.example/x?:20005"}, "bad_address"),
        ({**GEN2, "http_address": "user@10.0.0.1:20005"}, "bad_address"),
        ({**GEN2, "zmq_address": "host:10.0.0.1_x,handshake:6301,notify:61005"}, "bad_address"),
        ({**GEN2, "zmq_address": "host:10.0.0.1,handshake:abc,notify:61005"}, "bad_address"),
        ({**GEN2, "zmq_address": "host:10.0.0.1,handshake:6301,notify:70000"}, "bad_address"),
        ({**GEN1, "request_address": "not a url"}, "bad_address"),
        ({**GEN1, "handshake_port": 0}, "bad_address"),
        ({**GEN1, "notify_port": "x"}, "bad_address"),
        ({**GEN1, "role": "X"}, "bad_field"),
        # huge strings
        ({**GEN2, "http_address": HUGE + ":20005"}, "bad_field"),
        ({**GEN2, "zmq_address": "host:" + HUGE + ",handshake:1,notify:2"}, "bad_field"),
        ({**GEN1, "request_address": "http://" + HUGE + ":1/"}, "bad_field"),
    ],
)
def test_bad_registrations_are_rejected_with_a_reason(message, reason):
    with pytest.raises(RegistrationError) as info:
        parse_registration(message)
    assert info.value.reason == reason
