"""The two legs the proxy sends (docs/protocol.md §4-§5), as ``protocol.legs`` builds them.

A malformed leg kills a vLLM engine rather than failing one request, so every key the
connector reads is asserted here, against the values docs/protocol.md and vLLM 0.32 require.
"""

from __future__ import annotations

import copy

import pytest

from moriio_proxy.protocol import (
    DP_RANK_HEADER,
    REQUEST_ID_HEADER,
    check_read_params,
    parse_client_request,
    validate_dp_rank,
)
from tests.harness.wire import (
    P1,
    P_RETURNED,
    TRANSFER_ID,
    P,
    chat_body,
    completion_body,
    decode,
    prefill,
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
