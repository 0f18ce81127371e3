"""A prefill and a decode instance, client bodies and leg builders for tests of the wire
contract (``moriio_proxy.protocol``); the values are docs/protocol.md's examples."""

from __future__ import annotations

from typing import Any

from moriio_proxy.protocol import (
    ClientRequest,
    Instance,
    Leg,
    TransferMode,
    build_decode_leg,
    build_prefill_leg,
)

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

# P's heartbeat as vLLM 0.32 sends it (docs/protocol.md §2.1): registration makes it P.
P_HEARTBEAT = {
    "type": "P",
    "http_address": "10.0.0.1:20005",
    "zmq_address": "host:10.0.0.1,handshake:6301,notify:61005",
    "dp_size": 8,
    "tp_size": 2,
    "transfer_mode": "READ",
}

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


def completion_body(**extra: Any) -> dict[str, Any]:
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


def chat_body(**extra: Any) -> dict[str, Any]:
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


def prefill(
    request: ClientRequest,
    p: Instance = P,
    d: Instance = D,
    dp_rank: int = 3,
    request_id: str = "rid",
) -> Leg:
    return build_prefill_leg(
        request, p, d, transfer_id=TRANSFER_ID, request_id=request_id, dp_rank=dp_rank
    )


def decode(
    request: ClientRequest,
    mode: TransferMode,
    p: Instance = P,
    d: Instance = D,
    dp_rank: int = 3,
    params: Any = None,
    request_id: str = "rid",
) -> Leg:
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
