"""A READ-mode decode leg: the block-id checks and which prefill rank's ports it reads from.

0.32's ``update_state_after_alloc`` skips a transfer silently on some malformed legs (the
decode then answers garbage: ``NoTransfer``) and raises on others (``EngineCoreFatal``);
``read_source`` says which, in the order the connector checks. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tp_mapping import read_tp_refusal
from .addresses import port_offset
from .fatal import EngineCoreFatal
from .scheduler import add_new_req


@dataclass(frozen=True)
class ReadSource:
    """Where a READ-mode decode reads the KV from: one prefill DP rank's ports.

    ``block_ids`` is the one KV-cache group to read, or None when no prompt token is external
    (the decode computes the prompt itself but still releases the prefill's blocks).
    """

    host: str
    handshake_port: int
    notify_port: int
    transfer_id: Any
    block_ids: list[Any] | None


@dataclass(frozen=True)
class NoTransfer:
    """update_state_after_alloc skipped the transfer without raising: the KV never comes."""

    why: str
    invalid_params: bool = False  # 0.32 logs "Got invalid KVTransferParams"


def check_remote_groups(remote_block_ids: Any) -> list[Any]:
    """0.32 zips the local KV-cache groups (one here) with remote_block_ids, strict=True.

    A flat list of ints or several groups make that zip / _align_read_blocks raise in
    the scheduler: EngineCore dies.
    """
    if not isinstance(remote_block_ids, list):
        raise EngineCoreFatal(
            f"READ-mode decode leg: remote_block_ids {remote_block_ids!r} is not a list "
            "of per-KV-cache-group lists"
        )
    if len(remote_block_ids) != 1:
        raise EngineCoreFatal(
            f"READ-mode decode leg: remote_block_ids has {len(remote_block_ids)} entries "
            "but the model has 1 KV-cache group (zip(strict=True) raises ValueError); "
            "it must be NESTED like [[12, 13]], not flat"
        )
    group = remote_block_ids[0]
    if not isinstance(group, list):
        raise EngineCoreFatal(
            f"READ-mode decode leg: remote_block_ids is flat ({remote_block_ids!r}): "
            "_align_read_blocks calls len() on an int (TypeError); it must be NESTED"
        )
    return group


def read_source(
    kv: dict[str, Any], request_id: str, num_external: int, local_tp: int | None = None
) -> ReadSource | NoTransfer:
    """update_state_after_alloc's READ branch, then the worker's choice of ports; with
    ``local_tp``, the worker's TP-rank mapping too (a prefill of another TP size kills the
    engine, see ``tp_mapping.check_read_tp``)."""
    remote_block_ids = kv.get("remote_block_ids")
    if not remote_block_ids:
        return NoTransfer(
            f"remote_block_ids is {remote_block_ids!r} (0.32 then skips the transfer silently)"
        )
    if "remote_engine_id" not in kv:
        return NoTransfer(
            "kv_transfer_params without a 'remote_engine_id' key", invalid_params=True
        )
    group = check_remote_groups(remote_block_ids) if num_external > 0 else None
    meta = add_new_req(request_id, kv, write_mode=False)
    refusal = read_tp_refusal(local_tp, meta.tp_size) if local_tp and meta.tp_size else None
    if refusal is not None:
        raise EngineCoreFatal(f"READ-mode decode leg: {refusal}")
    try:
        rank = int(meta.remote_dp_rank)
    except (TypeError, ValueError) as e:
        raise EngineCoreFatal(
            f"READ-mode decode leg: remote_dp_rank {meta.remote_dp_rank!r} is not an "
            f"integer (worker _read_blocks raises {type(e).__name__})"
        ) from e
    offset = port_offset(rank, 0, meta.tp_size)
    return ReadSource(
        host=meta.remote_host,
        handshake_port=meta.remote_handshake_port + offset,
        notify_port=meta.remote_notify_port + offset,
        transfer_id=meta.transfer_id,
        block_ids=group,
    )
