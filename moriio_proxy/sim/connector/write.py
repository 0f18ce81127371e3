"""A WRITE-mode leg pair: where the prefill writes, whom the decode tells its blocks are ready.

The prefill resolves its decode from its own leg (``write_destination``); the decode
notifies one prefill rank (``blocks_notify``), or none on a DP rank that is not the
request's leader, which then waits forever in 0.32. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tp_mapping import write_tp_refusal
from .addresses import embedded_peer, parse_zmq_address, peer_zmq_from_request_id, port_offset
from .fatal import EngineCoreFatal
from .scheduler import add_new_req


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
    embedded = embedded_peer(request_id, False, "WRITE-mode decode leg")
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


def write_refusal(version: str, local_tp: int, dest: WriteDestination) -> None:
    """The 0.33 prefill's TP topology check (``tp_mapping.write_tp_refusal``) as the
    engine death it is."""
    refusal = write_tp_refusal(version, local_tp, dest.tp_size or local_tp)
    if refusal is not None:
        raise EngineCoreFatal(f"WRITE-mode prefill leg: {refusal}")
