"""The MoRI-IO connector's scheduler-side rules in vLLM 0.32 and 0.33, as pure functions.

These decide what a leg's ``kv_transfer_params`` and ``X-Request-Id`` mean: which peer to
talk to, on which port, with which block ids, and which request ids match. Where the real
connector raises inside EngineCore (``add_new_req`` and friends run in the scheduler) the
rule raises ``EngineCoreFatal`` and the whole simulated engine dies, as vLLM does; where it
silently skips a transfer the rule says why, and the decode answers garbage.

The rules read vLLM 0.32's ``kv_connector/v1/moriio/`` sources (``moriio_common.py``,
``moriio_connector.py``), and 0.33's where it differs; the wire contract is
``docs/protocol.md``. A connector behaviour that differs between vLLM versions is one of
these functions, or of ``tp_mapping`` (the package docstring lists them). Nothing here does
I/O or keeps state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .settings import VLLM_VERSIONS
from .tp_mapping import DecodeFacts, read_tp_refusal, write_tp_refusal

# moriio_common.py: the router embeds both zmq addresses in the request id (the "sandwich").
_PREFILL_ZMQ_RE = re.compile(r"___prefill_addr_(.+?)___decode_addr_")
_DECODE_ZMQ_RE = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}(?:-.*)?$")

LegKind = Literal["prefill", "decode", "plain"]


class EngineCoreFatal(Exception):
    """Raised where the real connector raises inside EngineCore: the whole engine dies."""


@dataclass(frozen=True)
class Advertised:
    """What this instance tells its peers about itself (heartbeat, handshake, prefill answer).

    Rank 0's ports are the bases; DP rank r listens on base + ``port_offset(r, 0)``.
    """

    host: str
    handshake_base: int
    notify_base: int
    dp_size: int
    tp_size: int

    @property
    def engine_id(self) -> str:
        """``host:handshake_base``, the id 0.32 puts in handshake metadata and answers."""
        return f"{self.host}:{self.handshake_base}"

    @property
    def zmq_address(self) -> str:
        """``host:IP,handshake:BASE,notify:BASE`` as the heartbeat advertises it."""
        return f"host:{self.host},handshake:{self.handshake_base},notify:{self.notify_base}"


def parse_zmq_address(zmq_address: str) -> tuple[str, int, int]:
    """``"host:IP,handshake:PORT,notify:PORT"``, each segment split on its first colon.

    Raises ValueError like 0.32's parse_moriio_zmq_address.
    """
    parts: dict[str, str] = {}
    for segment in zmq_address.split(","):
        key, _, val = segment.partition(":")
        parts[key.strip()] = val.strip()
    try:
        return parts["host"], int(parts["handshake"]), int(parts["notify"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Malformed zmq_address {zmq_address!r}: expected "
            "'host:IP,handshake:PORT,notify:PORT' format"
        ) from e


def peer_zmq_from_request_id(request_id: str, is_producer: bool) -> str | None:
    """The producer looks for the decode address, the consumer for the prefill address."""
    m = (_DECODE_ZMQ_RE if is_producer else _PREFILL_ZMQ_RE).search(request_id)
    return None if m is None else m.group(1)


def _embedded_peer(request_id: str, is_producer: bool, where: str) -> tuple[str, int, int] | None:
    """The peer (host, handshake, notify) the request-id sandwich embeds, or None without
    one; a malformed embedded address kills EngineCore."""
    peer = peer_zmq_from_request_id(request_id, is_producer)
    if peer is None:
        return None
    try:
        return parse_zmq_address(peer)
    except ValueError as e:
        side = "decode" if is_producer else "prefill"
        raise EngineCoreFatal(
            f"{where}: the X-Request-Id embeds a malformed {side} zmq_address ({e})"
        ) from e


def port_offset(dp_rank: int, tp_rank: int, tp_size: int = 1) -> int:
    """0.32 get_port_offset. Note most 0.32 call sites omit tp_size (so: dp_rank + tp_rank)."""
    return dp_rank * tp_size + tp_rank


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
    embedded = _embedded_peer(request_id, write_mode, where)
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


@dataclass(frozen=True)
class WriteDestination:
    """Where a WRITE-mode prefill writes: the decode it resolved from ITS OWN leg."""

    host: str
    handshake_base: int
    notify_base: int
    dp_local: int
    tp_size: int  # the decode TP the leg names (0: the same as the prefill's)
    dp_size: int = 1  # the leg's remote_dp_size: the decode ranks 0.33 tells of a failure

    def failure_ports(self) -> list[int]:
        """The notify ports of every decode DP rank, where a 0.33 prefill sends
        write_failed (the ports write_done uses, for ranks 0..remote_dp_size-1)."""
        return [self.ports(rank)[1] for rank in range(self.dp_size)]

    def ports(self, decode_rank: Any) -> tuple[int, int]:
        """(handshake, notify) port of the decode rank named by its "remote_blocks" notify
        (0.32 _execute_write_task). Raises ValueError on a rank that is not an integer."""
        try:
            rank = int(decode_rank)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad decode_rank {decode_rank!r}") from e
        port_rank = rank % self.dp_local if self.dp_local > 0 else rank
        return (
            self.handshake_base + port_offset(port_rank, 0, self.tp_size),
            self.notify_base + port_offset(port_rank, 0),
        )


def write_destination(request_id: str, kv: dict[str, Any]) -> WriteDestination:
    """add_new_req on a WRITE-mode prefill leg, then the worker's _write_blocks_for_req."""
    meta = add_new_req(request_id, kv, write_mode=True)
    try:
        dp_local = (
            int(meta.remote_dp_size_local)
            if meta.remote_dp_size_local
            else int(meta.remote_dp_size)
        )
    except (TypeError, ValueError) as e:
        raise EngineCoreFatal(
            f"WRITE-mode prefill leg: remote_dp_size {meta.remote_dp_size!r} is "
            f"not an integer ({e})"
        ) from e
    try:
        dp_size = max(int(meta.remote_dp_size), 1)
    except (TypeError, ValueError):
        dp_size = max(dp_local, 1)
    return WriteDestination(
        host=meta.remote_host,
        handshake_base=meta.remote_handshake_port,
        notify_base=meta.remote_notify_port,
        dp_local=dp_local,
        tp_size=meta.tp_size,
        dp_size=dp_size,
    )


@dataclass(frozen=True)
class BlocksNotify:
    """Where a WRITE-mode decode sends "my blocks are ready" (target None: it never does)."""

    target: tuple[str, int] | None
    unpinned_dp_size: int  # > 1: the router did not pin remote_dp_rank (0.32 warns, uses 0)
    remote_dp_rank: Any


def blocks_notify(kv: dict[str, Any], request_id: str, local_rank: int) -> BlocksNotify:
    """update_state_after_alloc, WRITE consumer branch: whom this decode rank notifies.

    With ``remote_dp_rank_override`` only the decode rank equal to ``remote_dp_rank`` sends
    the notify; on any other rank the request waits forever in 0.32.
    """
    remote_dp_rank = kv.get("remote_dp_rank", 0)
    try:
        dp_size = int(kv.get("remote_dp_size", 1) or 1)
    except (TypeError, ValueError) as e:
        raise EngineCoreFatal(
            f"WRITE-mode decode leg: remote_dp_size {kv.get('remote_dp_size')!r} is not an "
            f"integer ({e})"
        ) from e
    try:
        dp_local = int(kv.get("remote_dp_size_local", 0) or 0)
        if dp_local > 0:
            dp_size = min(dp_size, dp_local)
    except (TypeError, ValueError):
        dp_local = 0
    unpinned = dp_size > 1 and "remote_dp_rank" not in kv and "is_request_leader" not in kv
    leader = kv.get("is_request_leader")
    if leader is not None:
        should_notify = bool(leader)
    elif kv.get("remote_dp_rank_override"):
        should_notify = local_rank == remote_dp_rank  # 0.32: _global_dp_rank == remote_dp_rank
    else:
        should_notify = True  # _is_kv_master (single pod)
    if not should_notify:
        return BlocksNotify(None, dp_size if unpinned else 0, remote_dp_rank)
    embedded = _embedded_peer(request_id, False, "WRITE-mode decode leg")
    if embedded is not None:
        host, _, notify_base = embedded
    else:
        host = kv.get("remote_host") or ""
        try:
            notify_base = int(kv.get("remote_notify_port") or 0)
        except (TypeError, ValueError):
            notify_base = 0
        if not host or not notify_base:
            raise EngineCoreFatal(
                f"WRITE-mode decode leg: request {request_id!r} has no embedded "
                "prefill zmq_address and kv_transfer_params is missing remote_host / "
                f"remote_notify_port (got remote_host={host!r}, "
                f"remote_notify_port={notify_base!r})"
            )
    if type(remote_dp_rank) is not int:
        raise EngineCoreFatal(
            f"WRITE-mode decode leg: remote_dp_rank {remote_dp_rank!r} is not an "
            "integer (port arithmetic raises TypeError)"
        )
    port_rank = remote_dp_rank % dp_local if dp_local else remote_dp_rank
    target = (str(host), notify_base + port_offset(port_rank, 0))
    return BlocksNotify(target, dp_size if unpinned else 0, remote_dp_rank)


def write_prefill_release_target(kv: dict[str, Any], request_id: str) -> tuple[str, int] | None:
    """0.32 _release_write_prefill_blocks: where a WRITE decode aborted before scheduling
    tells the prefill to free its blocks (None: it cannot tell, the blocks wait for reaping)."""
    if kv.get("transfer_id") is None:
        return None
    host = kv.get("remote_host")
    port = kv.get("remote_notify_port")
    if host is None or port is None:
        peer = peer_zmq_from_request_id(request_id, is_producer=False)
        if peer is None:
            return None
        try:
            host, _, port = parse_zmq_address(peer)
        except ValueError:
            return None
    try:
        return str(host), int(port) + port_offset(int(kv.get("remote_dp_rank", 0)), 0)
    except (TypeError, ValueError):
        return None


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


def write_refusal(version: str, local_tp: int, dest: WriteDestination) -> None:
    """The 0.33 prefill's TP topology check (``tp_mapping.write_tp_refusal``) as the
    engine death it is."""
    refusal = write_tp_refusal(version, local_tp, dest.tp_size or local_tp)
    if refusal is not None:
        raise EngineCoreFatal(f"WRITE-mode prefill leg: {refusal}")
