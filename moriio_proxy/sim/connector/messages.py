"""The notify messages connectors send each other over ZMQ (release, remote_blocks,
write_failed), as vLLM 0.32 and 0.33 write them. Pure.
"""

from __future__ import annotations

from typing import Any

from ..tp_mapping import DecodeFacts


def notify_kind(message: dict[str, Any]) -> Any:
    """A notify message's type; 0.32's "remote_blocks" message may come without one."""
    kind = message.get("type")
    if kind is None and "req_id" in message:
        return "remote_blocks"
    return kind


def release_message(transfer_id: Any, consumer_tp_size: int) -> dict[str, Any]:
    """D -> P: done with the KV (or never needed it): free the blocks."""
    return {"type": "release", "transfer_id": transfer_id, "consumer_tp_size": consumer_tp_size}


def blocks_ready_message(
    request_id: str,
    transfer_id: Any,
    block_ids: list[int],
    decode_rank: int,
    facts: DecodeFacts | None = None,
) -> dict[str, Any]:
    """D -> P (WRITE): "my blocks are ready, write there" (the same in 0.32 and 0.33);
    ``facts`` adds what a real prefill learns about the decode by other means."""
    message = {
        "req_id": request_id,
        "transfer_id": transfer_id,
        "block_notify_list": block_ids,
        "decode_rank": decode_rank,
        "type": "remote_blocks",
    }
    if facts is not None:
        message.update(facts.fields())
    return message


def write_failed_message(transfer_id: Any) -> dict[str, Any]:
    """P -> every D DP rank (WRITE, 0.33): the KV of this transfer will never be written."""
    return {"type": "write_failed", "transfer_id": transfer_id}
