"""The simulator's version-dependent rules as pure functions: what 0.32 and 0.33 claim,
map, refuse and send (moriio_proxy/sim: connector, tp_mapping, settings)."""

from __future__ import annotations

import pytest

from moriio_proxy.sim import SimConfig
from moriio_proxy.sim.connector import (
    EngineCoreFatal,
    WriteDestination,
    blocks_ready_message,
    external_prompt_tokens,
    read_source,
    write_failed_message,
    write_refusal,
)
from moriio_proxy.sim.settings import VLLM_VERSIONS, write_mode_refusal
from moriio_proxy.sim.tp_mapping import (
    DecodeFacts,
    allocation_fanout,
    missing_allocation,
    peer_tp,
    read_tp_refusal,
    write_problem,
    write_tp_refusal,
)


def test_the_newest_release_is_the_default() -> None:
    assert VLLM_VERSIONS == ("0.32", "0.33")
    assert SimConfig(role="P").vllm_version == "0.33"
    with pytest.raises(ValueError, match=r"vllm_version must be one of 0\.32, 0\.33"):
        SimConfig(role="P", vllm_version="0.31").validate()


def test_a_read_consumer_claims_a_plain_prompt_only_in_032() -> None:
    assert external_prompt_tokens("D", "READ", 8, remote_prefill=False, version="0.32") == 7
    assert external_prompt_tokens("D", "READ", 8, remote_prefill=False, version="0.33") == 0
    for version in VLLM_VERSIONS:  # a real remote prefill: all but the last token
        assert external_prompt_tokens("D", "READ", 8, remote_prefill=True, version=version) == 7
        assert external_prompt_tokens("D", "WRITE", 8, remote_prefill=False, version=version) == 0


@pytest.mark.parametrize(
    ("mode", "arch", "version", "refused"),
    [
        ("WRITE", "hybrid", "0.32", "hybrid (mamba/KDA) transfer is implemented for READ"),
        ("WRITE", "hybrid", "0.33", None),
        ("WRITE", "sliding_window", "0.32", "hybrid KV cache groups (sliding-window"),
        ("WRITE", "sliding_window", "0.33", "does not support sliding-window cache groups"),
        ("READ", "hybrid", "0.32", None),
        ("READ", "sliding_window", "0.33", None),
        ("WRITE", "dense", "0.32", None),
    ],
)
def test_what_write_mode_refuses_at_start_up(
    mode: str, arch: str, version: str, refused: str | None
) -> None:
    found = write_mode_refusal(mode, arch, version)
    assert found is None if refused is None else refused in (found or "")
    config = SimConfig(role="D", mode=mode, model_arch=arch, vllm_version=version)
    if refused is None:
        config.validate()
    else:
        with pytest.raises(ValueError) as raised:
            config.validate()
        assert refused in str(raised.value)


def test_a_leg_names_the_peer_tp_or_means_mine() -> None:
    assert peer_tp({"remote_tp_size": 4, "tp_size": 2}, 1) == 4
    assert peer_tp({"tp_size": 2}, 1) == 2
    assert peer_tp({"remote_tp_size": 0}, 8) == 8
    assert peer_tp({"remote_tp_size": "x"}, 8) == 8


def test_a_033_prefill_dies_on_tp_sizes_it_cannot_map() -> None:
    assert write_tp_refusal("0.33", 2, 4) is None
    assert write_tp_refusal("0.33", 4, 2) is None
    assert write_tp_refusal("0.32", 2, 3) is None  # 0.32 checks nothing (and then hangs)
    assert "one TP size must divide the other" in (write_tp_refusal("0.33", 2, 3) or "")
    dest = WriteDestination("h", 1, 2, dp_local=1, tp_size=3)
    with pytest.raises(EngineCoreFatal, match="WRITE-mode prefill leg: prefill TP 2"):
        write_refusal("0.33", 2, dest)
    write_refusal("0.33", 3, dest)
    write_refusal("0.33", 3, WriteDestination("h", 1, 2, dp_local=1, tp_size=0))  # same as mine


def test_the_allocation_reaches_the_prefill_tp_the_decode_names() -> None:
    kv = {"remote_tp_size": 4}
    assert allocation_fanout("0.33", 2, kv) == 4
    assert allocation_fanout("0.32", 2, kv) == 2  # 0.32: its own TP
    assert missing_allocation(4, DecodeFacts(2, "0.33", fanout=4)) is None
    assert "never get it" in (missing_allocation(4, DecodeFacts(2, "0.32", fanout=2)) or "")


def test_a_write_lands_only_when_sizes_and_versions_allow() -> None:
    assert write_problem("0.33", 2, 4, DecodeFacts(4, "0.33", 2)) is None
    assert write_problem("0.32", 2, 2, DecodeFacts(2, "0.32", 2)) is None
    assert "wrong decode ranks" in (write_problem("0.33", 2, 2, DecodeFacts(4, "0.33", 2)) or "")
    assert "no WRITE TP mapping" in (write_problem("0.32", 2, 4, DecodeFacts(4, "0.33", 2)) or "")
    assert "KV-head layouts" in (write_problem("0.33", 2, 4, DecodeFacts(4, "0.32", 4)) or "")


def test_a_read_decode_dies_on_another_tp_size_in_both_versions() -> None:
    assert read_tp_refusal(2, 2) is None
    assert "MLA" in (read_tp_refusal(2, 4) or "")
    assert "divide" in (read_tp_refusal(2, 3) or "")
    kv = {
        "remote_block_ids": [[1, 2]],
        "remote_engine_id": "e",
        "remote_host": "h",
        "remote_handshake_port": 1,
        "remote_notify_port": 2,
        "tp_size": 4,
        "transfer_id": "tx",
    }
    with pytest.raises(EngineCoreFatal, match="READ-mode decode leg: prefill TP 4"):
        read_source(kv, "id", 3, local_tp=2)
    assert read_source(kv, "id", 3, local_tp=4).block_ids == [1, 2]  # type: ignore[union-attr]


def test_the_messages_of_a_failed_write() -> None:
    assert write_failed_message("tx-1") == {"type": "write_failed", "transfer_id": "tx-1"}
    message = blocks_ready_message("r", "tx", [1], 0, DecodeFacts(4, "0.33", 2))
    assert message["type"] == "remote_blocks"
    assert DecodeFacts.of(message, 1, "0.32") == DecodeFacts(4, "0.33", 2)
    assert DecodeFacts.of(blocks_ready_message("r", "tx", [1], 0), 2, "0.32") == DecodeFacts(
        2, "0.32", 2
    )
    dest = WriteDestination("h", 100, 200, dp_local=2, tp_size=1, dp_size=4)
    assert dest.failure_ports() == [200, 201, 200, 201]  # wraps at the local DP size
