"""The MoRI-IO connector rules of vLLM 0.32 as pure functions: which legs kill EngineCore,
which silently skip the transfer, and which ports a transfer uses (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from moriio_proxy.sim.connector import (
    Advertised,
    EngineCoreFatal,
    NoTransfer,
    ReadSource,
    WriteDestination,
    add_new_req,
    adopt_transfer_id,
    blocks_notify,
    check_remote_groups,
    external_prompt_tokens,
    leg_kind,
    notify_kind,
    parse_zmq_address,
    peer_zmq_from_request_id,
    port_offset,
    prefill_answer,
    read_source,
    write_destination,
    write_prefill_release_target,
)

P_ZMQ = "host:10.0.0.1,handshake:6301,notify:6401"
D_ZMQ = "host:10.0.0.2,handshake:7301,notify:7401"
SANDWICH = f"___prefill_addr_{P_ZMQ}___decode_addr_{D_ZMQ}_{'ab' * 16}"


def decode_kv(**changes: Any) -> dict[str, Any]:
    """A READ decode leg's kv_transfer_params as a prefill answers them."""
    kv: dict[str, Any] = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[3, 4]],
        "remote_engine_id": "10.0.0.1:6301",
        "remote_host": "10.0.0.1",
        "remote_handshake_port": "6301",
        "remote_notify_port": "6401",
        "remote_dp_rank": 1,
        "remote_dp_size": 2,
        "tp_size": 1,
        "transfer_id": "tx",
    }
    kv.update(changes)
    return kv


def test_zmq_address_parsing() -> None:
    assert parse_zmq_address(P_ZMQ) == ("10.0.0.1", 6301, 6401)
    assert parse_zmq_address("notify: 2 , host:::1,handshake:1") == ("::1", 1, 2)
    for bad in ("host:h,handshake:x,notify:1", "host:h,notify:1", ""):
        with pytest.raises(ValueError, match="Malformed zmq_address"):
            parse_zmq_address(bad)


def test_request_id_sandwich_gives_each_side_its_peer() -> None:
    assert peer_zmq_from_request_id(SANDWICH, is_producer=False) == P_ZMQ
    assert peer_zmq_from_request_id(SANDWICH, is_producer=True) == D_ZMQ
    # vLLM appends "-<suffix>" to the request id; the decode address still parses
    assert peer_zmq_from_request_id(f"cmpl-{SANDWICH}-0-1a2b", is_producer=True) == D_ZMQ
    assert peer_zmq_from_request_id("cmpl-plain-id", is_producer=False) is None


def test_port_offsets_and_leg_kinds() -> None:
    assert port_offset(3, 0) == 3 and port_offset(3, 1, tp_size=4) == 13
    assert leg_kind("P", {"do_remote_decode": True}) == "prefill"
    assert leg_kind("D", {"do_remote_prefill": True}) == "decode"
    assert leg_kind("D", {"do_remote_decode": True}) == "plain"  # wrong role: no transfer
    assert leg_kind("P", None) == "plain" and leg_kind("D", {}) == "plain"


def test_read_consumer_claims_all_but_the_last_prompt_token() -> None:
    assert external_prompt_tokens("D", "READ", 10) == 9
    assert external_prompt_tokens("D", "READ", 1) == 0
    assert external_prompt_tokens("D", "WRITE", 10) == 0
    assert external_prompt_tokens("P", "READ", 10) == 0


def test_missing_transfer_id_becomes_an_unmatchable_sidecar_id() -> None:
    kv: dict[str, Any] = {}
    assert adopt_transfer_id(kv, "req-1") == "sidecar-req-1" == kv["transfer_id"]
    kv = {"transfer_id": 7}
    assert adopt_transfer_id(kv, "req-1") == 7 and kv["transfer_id"] == 7
    kv = {"transfer_id": ""}  # falsy: the scheduler maps a sidecar id, the key stays ""
    assert adopt_transfer_id(kv, "req-1") == "sidecar-req-1" and kv["transfer_id"] == ""


def test_add_new_req_prefers_the_sandwich_over_explicit_keys() -> None:
    meta = add_new_req(SANDWICH, decode_kv(), write_mode=False)
    assert (meta.remote_host, meta.remote_handshake_port, meta.remote_notify_port) == (
        "10.0.0.1",
        6301,
        6401,
    )
    meta = add_new_req(SANDWICH, decode_kv(), write_mode=True)  # a producer reads D's part
    assert (meta.remote_host, meta.remote_notify_port) == ("10.0.0.2", 7401)
    meta = add_new_req("plain", decode_kv(remote_notify_port="9"), write_mode=False)
    assert meta.remote_notify_port == 9 and meta.remote_dp_size_local == 2
    bad_decode = f"___prefill_addr_{P_ZMQ}___decode_addr_host:h_{'ab' * 16}"
    with pytest.raises(EngineCoreFatal, match="malformed decode zmq_address"):
        add_new_req(bad_decode, decode_kv(), write_mode=True)
    assert add_new_req(bad_decode, decode_kv(), write_mode=False).remote_notify_port == 6401


@pytest.mark.parametrize(
    ("kv", "fragment"),
    [
        ({k: v for k, v in decode_kv().items() if k != "remote_engine_id"}, "remote_engine_id"),
        ({k: v for k, v in decode_kv().items() if k != "remote_block_ids"}, "remote_block_ids"),
        (decode_kv(remote_host=""), "remote_host"),
        ({k: v for k, v in decode_kv().items() if k != "remote_notify_port"}, "remote_host"),
        (decode_kv(remote_dp_size="two"), "remote_dp_size"),
        (decode_kv(tp_size="x"), "tp_size"),
    ],
)
def test_add_new_req_failures_kill_the_engine(kv: dict[str, Any], fragment: str) -> None:
    with pytest.raises(EngineCoreFatal, match=fragment):
        add_new_req("cmpl-no-sandwich", kv, write_mode=False)


def test_null_block_ids_and_engine_id_are_accepted_by_add_new_req() -> None:
    meta = add_new_req("r", decode_kv(remote_block_ids=None, remote_engine_id=None), False)
    assert meta.remote_block_ids is None


def test_remote_block_ids_must_be_one_nested_group() -> None:
    assert check_remote_groups([[1, 2]]) == [1, 2]
    with pytest.raises(EngineCoreFatal, match="flat"):
        check_remote_groups([5])
    with pytest.raises(EngineCoreFatal, match="2 entries"):
        check_remote_groups([1, 2])
    with pytest.raises(EngineCoreFatal, match="not a list"):
        check_remote_groups("1,2")


def test_read_source_addresses_the_prefill_rank() -> None:
    source = read_source(decode_kv(), "r", num_external=9)
    assert source == ReadSource("10.0.0.1", 6302, 6402, "tx", [3, 4])
    wide = read_source(decode_kv(tp_size=4), "r", num_external=9)
    assert isinstance(wide, ReadSource) and wide.notify_port == 6401 + 4
    only_release = read_source(decode_kv(), "r", num_external=0)
    assert isinstance(only_release, ReadSource) and only_release.block_ids is None


def test_read_source_skips_silently_or_kills() -> None:
    assert read_source(decode_kv(remote_block_ids=[]), "r", 9) == NoTransfer(
        "remote_block_ids is [] (0.32 then skips the transfer silently)"
    )
    no_engine = {k: v for k, v in decode_kv().items() if k != "remote_engine_id"}
    skipped = read_source(no_engine, "r", 9)
    assert isinstance(skipped, NoTransfer) and skipped.invalid_params
    with pytest.raises(EngineCoreFatal, match="NESTED"):
        read_source(decode_kv(remote_block_ids=[3, 4]), "r", 9)
    with pytest.raises(EngineCoreFatal, match="remote_dp_rank"):
        read_source(decode_kv(remote_dp_rank="one"), "r", 9)
    # nothing external: flat ids are never zipped, so they do not kill the engine
    assert isinstance(read_source(decode_kv(remote_block_ids=[3, 4]), "r", 0), ReadSource)


def test_write_destination_ports_follow_the_decode_rank() -> None:
    kv = {"transfer_id": "tx", "remote_block_ids": None, "remote_engine_id": None}
    dest = write_destination(SANDWICH, dict(kv, remote_dp_size=2, remote_tp_size=2))
    assert dest == WriteDestination("10.0.0.2", 7301, 7401, dp_local=2, tp_size=2, dp_size=2)
    assert dest.ports(1) == (7301 + 2, 7401 + 1)  # handshake uses tp_size, notify does not
    assert dest.ports(3) == (7301 + 2, 7401 + 1)  # wraps at the local DP size
    with pytest.raises(ValueError, match="decode_rank"):
        dest.ports("x")
    with pytest.raises(EngineCoreFatal, match="remote_engine_id"):
        write_destination(SANDWICH, {"transfer_id": "tx", "remote_block_ids": None})


def test_write_decode_notifies_the_prefill_rank_it_names() -> None:
    kv = {"transfer_id": "tx", "remote_dp_rank": 1, "remote_dp_size": 2}
    notify = blocks_notify(kv, SANDWICH, local_rank=0)
    assert notify.target == ("10.0.0.1", 6401 + 1) and not notify.unpinned_dp_size
    explicit = blocks_notify(dict(kv, remote_host="h", remote_notify_port=9), "r", 0)
    assert explicit.target == ("h", 10)
    unpinned = blocks_notify(
        {"remote_dp_size": 4, "remote_host": "h", "remote_notify_port": 9}, "r", 0
    )
    assert unpinned.unpinned_dp_size == 4 and unpinned.target == ("h", 9)


def test_write_decode_on_another_rank_than_the_override_never_notifies() -> None:
    kv = {"remote_dp_rank": 1, "remote_dp_rank_override": True}
    assert blocks_notify(kv, SANDWICH, local_rank=0).target is None
    assert blocks_notify(kv, SANDWICH, local_rank=1).target == ("10.0.0.1", 6402)
    assert blocks_notify(dict(kv, is_request_leader=False), SANDWICH, 1).target is None


@pytest.mark.parametrize(
    ("kv", "request_id", "fragment"),
    [
        ({}, "no-sandwich", "remote_host"),
        ({"remote_dp_rank": "1"}, SANDWICH, "remote_dp_rank"),
        ({"remote_dp_size": "x"}, SANDWICH, "remote_dp_size"),
        ({}, "___prefill_addr_host:h___decode_addr_x", "malformed"),
    ],
)
def test_write_decode_failures_kill_the_engine(
    kv: dict[str, Any], request_id: str, fragment: str
) -> None:
    with pytest.raises(EngineCoreFatal, match=fragment):
        blocks_notify(kv, request_id, local_rank=0)


def test_release_target_of_an_aborted_write_decode() -> None:
    kv = {"transfer_id": "tx", "remote_dp_rank": 1}
    assert write_prefill_release_target(kv, SANDWICH) == ("10.0.0.1", 6402)
    explicit = dict(kv, remote_host="h", remote_notify_port="9")
    assert write_prefill_release_target(explicit, "r") == ("h", 10)
    assert write_prefill_release_target({"remote_dp_rank": 1}, SANDWICH) is None
    assert write_prefill_release_target(kv, "no-sandwich") is None


def test_prefill_answer_shape() -> None:
    local = Advertised("10.0.0.1", 6301, 6401, dp_size=2, tp_size=1)
    assert local.engine_id == "10.0.0.1:6301" and local.zmq_address == P_ZMQ
    kv = prefill_answer(local, rank=1, block_ids=[3, 4], transfer_id="tx")
    assert kv["remote_block_ids"] == [[3, 4]]  # nested: one list per KV-cache group
    assert kv["remote_handshake_port"] == "6301" and kv["remote_notify_port"] == "6401"
    assert kv["remote_dp_rank"] == 1 and kv["remote_dp_rank_override"] is True
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    # what the decode receives feeds straight into its own rules
    assert read_source(dict(kv), "r", 5) == ReadSource("10.0.0.1", 6302, 6402, "tx", [3, 4])


def test_notify_kind_of_an_untyped_block_message() -> None:
    assert notify_kind({"req_id": "r", "block_notify_list": [1]}) == "remote_blocks"
    assert notify_kind({"type": "release"}) == "release"
    assert notify_kind({}) is None
