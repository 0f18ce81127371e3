"""The MoRI-IO wire contract (shared/docs/protocol.md) as the proxy builds and reads it.

A malformed leg kills a vLLM engine rather than failing one request, so every key the
connector reads is asserted here, against the values docs/protocol.md and vLLM 0.32 require.
"""

from __future__ import annotations

import copy
import re

import pytest

from moriio_proxy.disagg import new_nonce
from moriio_proxy.protocol import (
    DP_RANK_HEADER,
    REQUEST_ID_HEADER,
    ClientRequest,
    Instance,
    RegistrationError,
    RequestError,
    build_decode_leg,
    build_prefill_leg,
    check_read_params,
    error_body,
    new_request_id,
    new_transfer_id,
    parse_client_request,
    parse_registration,
    parse_zmq_address,
    prefill_as_answer,
    public_id,
    rewrite_id,
    split_host_port,
    validate_dp_rank,
)

# Copied verbatim from vLLM 0.32 moriio_common.py: what each connector side runs on the
# X-Request-Id to find its peer (P parses the decode address, D the prefill address).
_PREFILL_ZMQ_RE = re.compile(r"___prefill_addr_(.+?)___decode_addr_")
_DECODE_ZMQ_RE = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}(?:-.*)?$")

TX_RE = re.compile(r"tx-[0-9a-f]{32}")
TRANSFER_ID = "tx-" + "ab" * 16

# P and D differ in every field, so a leg that names the wrong peer cannot pass.
NONCE = "0123456789abcdef" * 2
P = Instance(
    role="P",
    http_address="10.0.0.1:20005",
    kv_host="10.0.0.1",
    handshake_port=6301,
    notify_port=61005,
    dp_size=8,
    tp_size=2,
    transfer_mode="READ",
)
D = Instance(
    role="D",
    http_address="10.0.0.2:40005",
    kv_host="10.0.0.2",
    handshake_port=7301,
    notify_port=7501,
    dp_size=4,
    tp_size=1,
    transfer_mode="READ",
)
P1 = Instance(
    role="P",
    http_address="10.0.0.3:20005",
    kv_host="10.0.0.3",
    handshake_port=6401,
    notify_port=6501,
    dp_size=1,
    tp_size=1,
    transfer_mode="WRITE",
)

# What vLLM 0.32's producer returns (docs/protocol.md §5.2): nested block ids, string ports.
P_RETURNED = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[12, 13, 14], [40, 41]],
    "remote_engine_id": "10.0.0.1:6301",
    "remote_host": "10.0.0.1",
    "remote_handshake_port": "6301",
    "remote_notify_port": "61005",
    "remote_dp_rank": 3,
    "remote_dp_rank_override": True,
    "remote_dp_size": 8,
    "remote_dp_size_local": 8,
    "tp_size": 2,
    "transfer_id": TRANSFER_ID,
    "remote_prefill_cached_tokens": 0,
}


def completion_body(**extra):
    body = {
        "model": "m",
        "prompt": "Hello",
        "max_tokens": 16,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n"],
    }
    body.update(extra)
    return body


def chat_body(**extra):
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "max_completion_tokens": 16,
        "stream": True,
        "stop": "END",
    }
    body.update(extra)
    return body


def prefill(request: ClientRequest, p=P, d=D, dp_rank=3, request_id="rid"):
    return build_prefill_leg(
        request, p, d, transfer_id=TRANSFER_ID, request_id=request_id, dp_rank=dp_rank
    )


def decode(request: ClientRequest, mode, p=P, d=D, dp_rank=3, params=None, request_id="rid"):
    return build_decode_leg(
        request,
        p,
        d,
        mode=mode,
        transfer_id=TRANSFER_ID,
        request_id=request_id,
        dp_rank=dp_rank,
        prefill_params=params,
    )


# ----------------------------------------------------------------------- prefill leg


def test_prefill_leg_kv_transfer_params_are_exactly_the_contract():
    leg = prefill(parse_client_request("completions", completion_body()))
    params = leg.body["kv_transfer_params"]
    assert params == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": TRANSFER_ID,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": "10.0.0.2",
        "remote_handshake_port": 7301,
        "remote_notify_port": 7501,
        "remote_dp_size": 4,
        "remote_tp_size": 1,
        "tp_size": 1,
    }
    # A WRITE producer indexes these keys: they must exist even though they are null.
    assert "remote_engine_id" in params and params["remote_engine_id"] is None
    assert "remote_block_ids" in params and params["remote_block_ids"] is None


def test_prefill_leg_goes_to_p_on_the_clients_path():
    completions = prefill(parse_client_request("completions", completion_body()))
    chat = prefill(parse_client_request("chat", chat_body()))
    assert completions.url == "http://10.0.0.1:20005/v1/completions"
    assert chat.url == "http://10.0.0.1:20005/v1/chat/completions"


def test_prefill_leg_body_is_one_unstreamed_token_without_stop():
    leg = prefill(parse_client_request("completions", completion_body()))
    body = leg.body
    assert body["stream"] is False
    assert "stream_options" not in body
    assert "stop" not in body
    assert body["max_tokens"] == 1
    assert body["min_tokens"] == 1
    assert "max_completion_tokens" not in body
    # Everything else is the client's.
    assert body["model"] == "m"
    assert body["prompt"] == "Hello"
    assert body["temperature"] == 0.5


def test_prefill_leg_caps_max_completion_tokens_only_when_present():
    with_it = prefill(parse_client_request("chat", chat_body()))
    assert with_it.body["max_completion_tokens"] == 1
    assert with_it.body["max_tokens"] == 1
    assert with_it.body["stream"] is False
    assert "stop" not in with_it.body

    body = chat_body()
    del body["max_completion_tokens"]
    del body["max_tokens"]
    without = prefill(parse_client_request("chat", body))
    assert "max_completion_tokens" not in without.body
    assert without.body["max_tokens"] == 1
    assert without.body["min_tokens"] == 1


def test_prefill_leg_of_an_unstreamed_request_is_still_unstreamed():
    body = completion_body(stream=False)
    del body["stream_options"]
    leg = prefill(parse_client_request("completions", body))
    assert leg.body["stream"] is False
    assert "stream_options" not in leg.body


def test_client_kv_transfer_params_are_replaced_not_merged():
    # vLLM reads kv_transfer_params.prompt_token_ids as the prompt: nothing may leak through.
    smuggled = {
        "prompt_token_ids": [1, 2, 3],
        "remote_host": "6.6.6.6",
        "do_remote_decode": False,
        "remote_dp_rank_override": True,
        "extra": "x",
    }
    request = parse_client_request("completions", completion_body(kv_transfer_params=smuggled))
    p_leg = prefill(request)
    read_leg = decode(request, "READ", params=P_RETURNED)
    write_leg = decode(request, "WRITE")
    for leg in (p_leg, read_leg, write_leg):
        params = leg.body["kv_transfer_params"]
        assert "prompt_token_ids" not in params
        assert "extra" not in params
        assert params["remote_host"] != "6.6.6.6"
    assert "remote_dp_rank_override" not in write_leg.body["kv_transfer_params"]
    assert p_leg.body["kv_transfer_params"]["do_remote_decode"] is True


def test_building_legs_does_not_mutate_the_clients_body():
    body = completion_body(kv_transfer_params={"prompt_token_ids": [1]})
    original = copy.deepcopy(body)
    request = parse_client_request("completions", body)
    prefill(request)
    decode(request, "READ", params=P_RETURNED)
    decode(request, "WRITE")
    assert body == original
    assert request.body == original


def test_prefill_leg_headers_carry_the_request_id_and_dp_rank():
    leg = prefill(parse_client_request("completions", completion_body()), dp_rank=5)
    assert leg.headers == {REQUEST_ID_HEADER: "rid", DP_RANK_HEADER: "5"}


def test_no_dp_rank_header_when_prefill_has_one_dp_rank():
    leg = prefill(parse_client_request("completions", completion_body()), p=P1, dp_rank=0)
    assert DP_RANK_HEADER not in leg.headers
    assert leg.headers[REQUEST_ID_HEADER] == "rid"


@pytest.mark.parametrize("rank", [8, 9, -1, True])
def test_dp_rank_out_of_range_is_refused(rank):
    request = parse_client_request("completions", completion_body())
    with pytest.raises(ValueError):
        prefill(request, dp_rank=rank)
    with pytest.raises(ValueError):
        validate_dp_rank(rank, 8)


def test_every_dp_rank_in_range_is_sent_as_a_decimal():
    request = parse_client_request("completions", completion_body())
    for rank in range(P.dp_size):
        assert prefill(request, dp_rank=rank).headers[DP_RANK_HEADER] == str(rank)
        assert validate_dp_rank(rank, P.dp_size) == rank


# ------------------------------------------------------------------------ decode leg


def test_read_decode_forwards_p_params_untouched_plus_direction_flags():
    returned = copy.deepcopy(P_RETURNED)
    request = parse_client_request("completions", completion_body())
    leg = decode(request, "READ", params=returned)
    params = leg.body["kv_transfer_params"]
    assert params == {**P_RETURNED, "do_remote_decode": False, "do_remote_prefill": True}
    # Nested block ids and string ports survive as they are (flattening kills READ decode).
    assert params["remote_block_ids"] == [[12, 13, 14], [40, 41]]
    assert params["remote_handshake_port"] == "6301"
    assert params["remote_notify_port"] == "61005"
    assert params["remote_dp_rank"] == 3
    assert returned == P_RETURNED  # P's answer itself is not modified


def test_read_decode_sets_direction_flags_whatever_p_returned():
    returned = {**P_RETURNED, "do_remote_prefill": False, "do_remote_decode": True}
    leg = decode(parse_client_request("completions", completion_body()), "READ", params=returned)
    assert leg.body["kv_transfer_params"]["do_remote_prefill"] is True
    assert leg.body["kv_transfer_params"]["do_remote_decode"] is False


def test_read_decode_adds_p_address_keys_only_when_absent():
    returned = copy.deepcopy(P_RETURNED)
    for key in ("remote_host", "remote_handshake_port", "remote_notify_port"):
        del returned[key]
    request = parse_client_request("completions", completion_body())
    params = decode(request, "READ", params=returned).body["kv_transfer_params"]
    assert params["remote_host"] == "10.0.0.1"
    assert params["remote_handshake_port"] == 6301
    assert params["remote_notify_port"] == 61005

    # Present keys win over the registry's values, even when they differ.
    returned = {
        **P_RETURNED,
        "remote_host": "192.168.9.9",
        "remote_handshake_port": "1111",
        "remote_notify_port": "2222",
    }
    params = decode(request, "READ", params=returned).body["kv_transfer_params"]
    assert params["remote_host"] == "192.168.9.9"
    assert params["remote_handshake_port"] == "1111"
    assert params["remote_notify_port"] == "2222"


def test_read_decode_needs_p_params():
    with pytest.raises(ValueError):
        decode(parse_client_request("completions", completion_body()), "READ", params=None)


def test_write_decode_kv_transfer_params_are_exactly_the_contract():
    request = parse_client_request("completions", completion_body())
    p_leg = prefill(request, dp_rank=6)
    d_leg = decode(request, "WRITE", dp_rank=6)
    params = d_leg.body["kv_transfer_params"]
    assert params == {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "transfer_id": TRANSFER_ID,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": "10.0.0.1",
        "remote_handshake_port": 6301,
        "remote_notify_port": 61005,
        "remote_dp_size": 8,
        "remote_tp_size": 2,
        "tp_size": 2,
        "remote_dp_rank": 6,
    }
    assert "remote_engine_id" in params and "remote_block_ids" in params
    assert "remote_dp_rank_override" not in params
    # The rank D is told is the one P was sent; the transfer id is the same on both legs.
    assert str(params["remote_dp_rank"]) == p_leg.headers[DP_RANK_HEADER]
    assert params["transfer_id"] == p_leg.body["kv_transfer_params"]["transfer_id"]


def test_write_decode_with_single_rank_prefill_names_rank_zero():
    request = parse_client_request("completions", completion_body())
    params = decode(request, "WRITE", p=P1, dp_rank=0).body["kv_transfer_params"]
    assert params["remote_dp_rank"] == 0
    assert params["remote_dp_size"] == 1
    assert "remote_dp_rank_override" not in params
    with pytest.raises(ValueError):
        decode(request, "WRITE", p=P1, dp_rank=1)


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
def test_decode_leg_keeps_the_clients_body_and_max_tokens(mode):
    body = completion_body(max_tokens=16)
    request = parse_client_request("completions", body)
    leg = decode(request, mode, params=P_RETURNED)
    assert leg.url == "http://10.0.0.2:40005/v1/completions"
    assert leg.headers == {REQUEST_ID_HEADER: "rid"}  # D's own balancer picks its rank
    without_params = {k: v for k, v in leg.body.items() if k != "kv_transfer_params"}
    assert without_params == body
    assert leg.body["max_tokens"] == 16  # not decremented: D generates every token
    assert leg.body["stream"] is True
    assert leg.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
def test_decode_leg_max_tokens_one_and_chat_without_max_tokens(mode):
    one = decode(
        parse_client_request("completions", completion_body(max_tokens=1)), mode, params=P_RETURNED
    )
    assert one.body["max_tokens"] == 1

    body = chat_body()
    del body["max_tokens"]
    del body["max_completion_tokens"]
    chat = decode(parse_client_request("chat", body), mode, params=P_RETURNED)
    assert chat.url == "http://10.0.0.2:40005/v1/chat/completions"
    assert "max_tokens" not in chat.body
    assert "max_completion_tokens" not in chat.body

    chat = decode(parse_client_request("chat", chat_body()), mode, params=P_RETURNED)
    assert chat.body["max_tokens"] == 16
    assert chat.body["max_completion_tokens"] == 16


# ------------------------------------------------------------------------ identifiers


def test_request_id_sandwich_matches_vllm_regexes():
    rid = new_request_id(P, D, NONCE)
    assert re.fullmatch(
        r"___prefill_addr_host:10\.0\.0\.1,handshake:6301,notify:61005"
        r"___decode_addr_host:10\.0\.0\.2,handshake:7301,notify:7501_[0-9a-f]{32}",
        rid,
    )
    # P (producer) reads the decode address, D (consumer) the prefill address.
    decode_zmq = _DECODE_ZMQ_RE.search(rid).group(1)
    prefill_zmq = _PREFILL_ZMQ_RE.search(rid).group(1)
    assert decode_zmq == D.zmq_address
    assert prefill_zmq == P.zmq_address
    assert parse_zmq_address(decode_zmq) == ("10.0.0.2", 7301, 7501)
    assert parse_zmq_address(prefill_zmq) == ("10.0.0.1", 6301, 61005)


def test_request_id_sandwich_survives_vllm_wrapping():
    # vLLM wraps X-Request-Id as "cmpl-<id>-<seq>-<hex>" before the connector sees it.
    rid = new_request_id(P, D, NONCE)
    wrapped = f"cmpl-{rid}-0-1a2b3c4d"
    assert _DECODE_ZMQ_RE.search(wrapped).group(1) == D.zmq_address
    assert _PREFILL_ZMQ_RE.search(wrapped).group(1) == P.zmq_address


def test_request_id_sandwich_with_ipv6_hosts():
    p6 = parse_registration(
        {
            "type": "P",
            "http_address": "fd00::1:20005",
            "zmq_address": "host:fd00::1,handshake:6301,notify:61005",
            "dp_size": 1,
            "tp_size": 1,
            "transfer_mode": "READ",
        }
    )
    d6 = parse_registration(
        {
            "type": "D",
            "http_address": "::1:40005",
            "zmq_address": "host:::1,handshake:7301,notify:7501",
            "dp_size": 1,
            "tp_size": 1,
            "transfer_mode": "READ",
        }
    )
    rid = new_request_id(p6, d6, NONCE)
    assert parse_zmq_address(_DECODE_ZMQ_RE.search(rid).group(1)) == ("::1", 7301, 7501)
    assert parse_zmq_address(_PREFILL_ZMQ_RE.search(rid).group(1)) == ("fd00::1", 6301, 61005)


def test_ids_carry_the_requests_nonce():
    assert new_request_id(P, D, NONCE).endswith("_" + NONCE)
    assert TX_RE.fullmatch(new_transfer_id(NONCE))


def test_nonces_are_32_hex_and_fresh():
    nonces = [new_nonce() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces)
    assert len(set(nonces)) == len(nonces)


def test_public_id_never_carries_the_sandwich():
    assert public_id("chat", "abc") == "chatcmpl-abc"
    assert public_id("completions", "abc") == "cmpl-abc"
    assert "addr" not in public_id("chat", "abc")


def test_rewrite_id_replaces_id_and_drops_internal_params():
    payload = {
        "id": "cmpl-" + new_request_id(P, D, NONCE),
        "kv_transfer_params": P_RETURNED,
        "x": 1,
    }
    assert rewrite_id(payload, "cmpl-public") == {"id": "cmpl-public", "x": 1}


# ----------------------------------------------------------------------- registration

GEN2 = {
    "type": "P",
    "http_address": "10.0.0.1:20005",
    "zmq_address": "host:10.0.0.1,handshake:6301,notify:61005",
    "dp_size": 8,
    "tp_size": 2,
    "transfer_mode": "READ",
}
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


def test_ipv6_http_address_is_bracketed_for_urls():
    instance = parse_registration(
        {
            **GEN2,
            "http_address": "::1:20005",
            "zmq_address": "host:::1,handshake:6301,notify:61005",
        }
    )
    assert instance.http_address == "::1:20005"
    assert instance.key == ("P", "::1:20005")
    assert instance.base_url == "http://[::1]:20005"
    assert instance.kv_host == "::1"
    assert instance.handshake_port == 6301
    assert instance.notify_port == 61005
    leg = prefill(parse_client_request("completions", completion_body()), p=instance, d=D)
    assert leg.url == "http://[::1]:20005/v1/completions"


def test_ipv6_zmq_host_splits_on_first_colon():
    assert parse_zmq_address("host:::1,handshake:6301,notify:61005") == ("::1", 6301, 61005)
    assert parse_zmq_address("host:fe80::2:3,handshake:1,notify:2") == ("fe80::2:3", 1, 2)


def test_gen1_ipv6_request_address():
    instance = parse_registration({**GEN1, "request_address": "http://[::1]:20005/v1/completions"})
    assert instance.kv_host == "::1"
    assert instance.base_url == "http://[::1]:20005"


def test_split_host_port():
    assert split_host_port("10.0.0.1:80") == ("10.0.0.1", 80)
    assert split_host_port("fd00::1:20005") == ("fd00::1", 20005)
    assert split_host_port("[::1]:8000") == ("::1", 8000)
    for bad in ("10.0.0.1", ":80", "10.0.0.1:0", "10.0.0.1:65536", "h:x", "[::1]8000"):
        with pytest.raises(ValueError):
            split_host_port(bad)


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


# ---------------------------------------------------------------------- client request


def test_single_string_prompt_is_accepted():
    request = parse_client_request("completions", completion_body())
    assert request.endpoint == "completions"
    assert request.stream is True
    assert request.include_usage is True
    assert request.model == "m"


@pytest.mark.parametrize("prompt", [[1, 2, 3], ["one prompt"], [[1, 2, 3]]])
def test_one_prompt_in_list_form_is_accepted(prompt):
    request = parse_client_request("completions", {"prompt": prompt})
    assert request.body["prompt"] == prompt
    assert request.stream is False
    assert request.include_usage is False
    assert request.model is None


@pytest.mark.parametrize(
    "prompt", [["a", "b"], [[1, 2], [3, 4]], [1, "a"], [], 42, None, [True, False]]
)
def test_multi_or_bad_prompts_are_refused(prompt):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": prompt})
    assert info.value.param == "prompt"


def test_missing_prompt_is_refused():
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"model": "m"})
    assert info.value.param == "prompt"


@pytest.mark.parametrize("n", [2, 0, True, 1.0, "1"])
def test_n_other_than_one_is_refused(n):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": "x", "n": n})
    assert info.value.param == "n"


@pytest.mark.parametrize("n", [1, None])
def test_n_one_is_accepted(n):
    assert parse_client_request("chat", chat_body(n=n)).endpoint == "chat"


@pytest.mark.parametrize("messages", ["missing", None, [], "hi", {"role": "user"}])
def test_chat_needs_a_non_empty_messages_list(messages):
    body = chat_body()
    if messages == "missing":
        del body["messages"]
    else:
        body["messages"] = messages
    with pytest.raises(RequestError) as info:
        parse_client_request("chat", body)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stream": "yes"}, "stream"), ({"stream_options": "usage"}, "stream_options")],
)
def test_bad_stream_fields_are_refused(extra, param):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": "x", **extra})
    assert info.value.param == param


@pytest.mark.parametrize("body", [[{"prompt": "x"}], "x", None])
def test_non_object_body_is_refused(body):
    with pytest.raises(RequestError):
        parse_client_request("completions", body)


# --------------------------------------------------------------------- check_read_params


def test_check_read_params_accepts_nested_block_ids():
    assert check_read_params(P_RETURNED, TRANSFER_ID) is None
    without_tx = {k: v for k, v in P_RETURNED.items() if k != "transfer_id"}
    assert check_read_params(without_tx, TRANSFER_ID) is None


@pytest.mark.parametrize(
    ("params", "mentions"),
    [
        ({**P_RETURNED, "remote_block_ids": [12, 13, 14]}, "remote_block_ids"),
        ({**P_RETURNED, "remote_block_ids": []}, "remote_block_ids"),
        ({**P_RETURNED, "remote_block_ids": [[]]}, "remote_block_ids"),
        ({**P_RETURNED, "remote_block_ids": None}, "remote_block_ids"),
        ({k: v for k, v in P_RETURNED.items() if k != "remote_block_ids"}, "remote_block_ids"),
        ({k: v for k, v in P_RETURNED.items() if k != "remote_engine_id"}, "remote_engine_id"),
        ({**P_RETURNED, "remote_engine_id": None}, "remote_engine_id"),
        ({**P_RETURNED, "transfer_id": "tx-" + "cd" * 16}, "transfer_id"),
        (None, "kv_transfer_params"),
        ([[1]], "kv_transfer_params"),
    ],
)
def test_check_read_params_explains_what_is_unusable(params, mentions):
    problem = check_read_params(params, TRANSFER_ID)
    assert problem is not None
    assert mentions in problem


# --------------------------------------------------------------------- prefill answers

USAGE = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}


def completion_payload():
    return {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 123,
        "model": "m",
        "choices": [
            {"index": 0, "text": "!", "finish_reason": "stop", "stop_reason": 2, "logprobs": None}
        ],
        "usage": USAGE,
        "kv_transfer_params": None,
    }


def chat_payload():
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 123,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Yes"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "kv_transfer_params": None,
    }


def test_prefill_as_answer_completions_without_usage():
    chunks = prefill_as_answer(completion_payload(), "completions", include_usage=False)
    assert chunks == [
        {
            "id": "cmpl-x",
            "created": 123,
            "model": "m",
            "object": "text_completion",
            "choices": [
                {
                    "index": 0,
                    "text": "!",
                    "finish_reason": "stop",
                    "logprobs": None,
                    "stop_reason": 2,
                }
            ],
        }
    ]


def test_prefill_as_answer_completions_with_usage():
    chunks = prefill_as_answer(completion_payload(), "completions", include_usage=True)
    assert len(chunks) == 2
    assert chunks[0]["choices"][0]["text"] == "!"
    assert "usage" not in chunks[0]
    assert chunks[1]["choices"] == []
    assert chunks[1]["usage"] == USAGE
    assert chunks[1]["object"] == "text_completion"
    assert all("kv_transfer_params" not in c for c in chunks)


def test_prefill_as_answer_chat_without_usage():
    chunks = prefill_as_answer(chat_payload(), "chat", include_usage=False)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 2
    assert all(c["id"] == "chatcmpl-x" and c["model"] == "m" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[1]["choices"][0]
    assert last["delta"] == {"content": "Yes"}
    assert last["finish_reason"] == "stop"
    assert last["index"] == 0
    assert all("usage" not in c for c in chunks)


def test_prefill_as_answer_chat_with_usage():
    chunks = prefill_as_answer(chat_payload(), "chat", include_usage=True)
    assert len(chunks) == 3
    assert chunks[-1]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "Yes"


def test_prefill_as_answer_without_usage_in_payload_adds_no_usage_chunk():
    payload = completion_payload()
    del payload["usage"]
    assert len(prefill_as_answer(payload, "completions", include_usage=True)) == 1


# -------------------------------------------------------------------------- errors


def test_error_body_has_vllms_shape():
    assert error_body("bad prompt", 400, param="prompt") == {
        "error": {
            "message": "bad prompt",
            "type": "BadRequestError",
            "param": "prompt",
            "code": 400,
        }
    }
    body = error_body("no instances", 503)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == 503
    assert isinstance(body["error"]["code"], int)
    assert body["error"]["param"] is None
    assert body["error"]["message"] == "no instances"
    assert error_body("x", 502, err_type="Custom")["error"]["type"] == "Custom"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "8"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"prompt": "a", "stream": False, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
    ],
)
def test_requests_a_decode_engine_would_refuse_are_refused_before_any_leg(body, param):
    # The prefill leg (one token, no stream options) would pass these, and in READ mode
    # its KV blocks would then wait on P for defer_timeout.
    with pytest.raises(RequestError) as err:
        parse_client_request("completions", body)
    assert err.value.param == param


def test_empty_stream_options_without_stream_are_accepted_as_vllm_does():
    parse_client_request("completions", {"prompt": "a", "stream_options": {}})
    parse_client_request("completions", {"prompt": "a", "max_tokens": None})
