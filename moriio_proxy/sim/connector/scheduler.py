"""The scheduler side of a leg: which path it takes, what it claims, what add_new_req reads.

``add_new_req`` runs in the scheduler's ``build_connector_meta`` (vLLM 0.32
``moriio_connector.py``): every exception there kills EngineCore, so each check turns into
``EngineCoreFatal`` with a sentence naming the cause. ``prefill_answer`` is the other end:
what a finished prefill leg hands back for the decode. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..settings import VLLM_VERSIONS
from .addresses import Advertised, embedded_peer
from .fatal import EngineCoreFatal

LegKind = Literal["prefill", "decode", "plain"]


def leg_kind(role: str, kv: dict[str, Any] | None) -> LegKind:
    """Which connector path an engine request takes on an instance of this role."""
    if kv and role == "P" and kv.get("do_remote_decode"):
        return "prefill"
    if kv and role == "D" and kv.get("do_remote_prefill"):
        return "decode"
    return "plain"


def external_prompt_tokens(
    role: str,
    mode: str,
    n_prompt: int,
    remote_prefill: bool = True,
    version: str = VLLM_VERSIONS[-1],
) -> int:
    """Prompt tokens the connector claims will arrive as KV (get_num_new_matched_tokens).

    0.32's READ consumer claims all but the last prompt token without looking at
    ``do_remote_prefill``, so a plain request sent to it never computes them (garbage).
    0.33 claims nothing for a request without ``do_remote_prefill``: it is served as a
    plain vLLM would, prompt computed locally.
    """
    if role == "D" and mode == "READ" and (remote_prefill or version == "0.32"):
        return max(n_prompt - 1, 0)
    return 0


def adopt_transfer_id(kv: dict[str, Any], engine_id: str) -> Any:
    """update_state_after_alloc: the leg's transfer_id, or ``sidecar-<id>``, which the other
    leg can never match (so a WRITE decode then waits forever). Sets it into ``kv`` when the
    key is missing; the id is used as the client sent it (any JSON value)."""
    tid = kv.get("transfer_id") or f"sidecar-{engine_id}"
    kv.setdefault("transfer_id", tid)
    return tid


@dataclass(frozen=True)
class ReqMeta:
    """What 0.32's add_new_req extracts from kv_transfer_params (ReqMeta)."""

    transfer_id: Any
    remote_host: str
    remote_handshake_port: int
    remote_notify_port: int
    remote_dp_size_local: int
    remote_dp_size: Any
    remote_dp_rank: Any
    remote_block_ids: Any
    tp_size: int


def add_new_req(request_id: str, kv: dict[str, Any], write_mode: bool) -> ReqMeta:
    """0.32 MoRIIOConnectorMetadata.add_new_req.

    Runs in the scheduler's build_connector_meta: every exception here kills EngineCore,
    so each is turned into EngineCoreFatal with a sentence naming the cause.
    """
    where = "WRITE-mode prefill leg" if write_mode else "READ-mode decode leg"
    if "transfer_id" not in kv:  # unreachable after update_state_after_alloc's setdefault
        raise EngineCoreFatal(f"{where}: kv_transfer_params has no 'transfer_id' key (KeyError)")
    embedded = embedded_peer(request_id, write_mode, where)
    if embedded is not None:
        host, hs_port, notify_port = embedded
    else:
        try:
            host = kv["remote_host"]
            if not host:
                raise ValueError("kv_transfer_params['remote_host'] is empty")
            hs_port = int(kv["remote_handshake_port"])
            notify_port = int(kv["remote_notify_port"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineCoreFatal(
                f"{where}: request id {request_id!r} embeds no peer zmq_address and "
                "kv_transfer_params lacks a usable remote_host / remote_handshake_port / "
                f"remote_notify_port ({type(e).__name__}: {e})"
            ) from e
    try:
        dp_local = int(kv.get("remote_dp_size_local", kv.get("remote_dp_size", 1)))
    except (TypeError, ValueError) as e:
        raise EngineCoreFatal(
            f"{where}: remote_dp_size_local/remote_dp_size is not an integer "
            f"({type(e).__name__}: {e})"
        ) from e
    for key in ("remote_block_ids", "remote_engine_id"):
        if key not in kv:
            raise EngineCoreFatal(
                f"{where}: kv_transfer_params has no {key!r} key (KeyError in add_new_req; "
                "the key must exist, null is fine)"
            )
    try:
        tp = int(kv.get("remote_tp_size") or kv.get("tp_size") or 0)
    except (TypeError, ValueError) as e:
        raise EngineCoreFatal(f"{where}: remote_tp_size/tp_size is not an integer ({e})") from e
    return ReqMeta(
        transfer_id=kv["transfer_id"],
        remote_host=str(host),
        remote_handshake_port=hs_port,
        remote_notify_port=notify_port,
        remote_dp_size_local=dp_local,
        remote_dp_size=kv.get("remote_dp_size", 1),
        remote_dp_rank=kv.get("remote_dp_rank", 0),
        remote_block_ids=kv["remote_block_ids"],
        tp_size=tp,
    )


def prefill_answer(
    local: Advertised, rank: int, block_ids: list[int], transfer_id: Any
) -> dict[str, Any]:
    """request_finished's kv_transfer_params for a length-capped prefill leg (0.32)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(block_ids)],
        "remote_engine_id": local.engine_id,
        "remote_host": local.host,
        "remote_handshake_port": str(local.handshake_base),
        "remote_notify_port": str(local.notify_base),
        "remote_dp_rank": rank,
        "remote_dp_rank_override": True,
        "remote_dp_size": local.dp_size,
        "remote_dp_size_local": local.dp_size,
        "tp_size": local.tp_size,
        "transfer_id": transfer_id,
    }
