"""Where a connector's peer is: the request-id sandwich, zmq addresses and port offsets.

The router embeds both sides' zmq addresses in the request id (vLLM 0.32
``moriio_common.py``); the connector prefers that over ``kv_transfer_params``. Each DP rank
listens on the advertised base port plus ``port_offset`` (docs/protocol.md). Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .fatal import EngineCoreFatal

# moriio_common.py: the router embeds both zmq addresses in the request id (the "sandwich").
_PREFILL_ZMQ_RE = re.compile(r"___prefill_addr_(.+?)___decode_addr_")
_DECODE_ZMQ_RE = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}(?:-.*)?$")


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


def embedded_peer(request_id: str, is_producer: bool, where: str) -> tuple[str, int, int] | None:
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
