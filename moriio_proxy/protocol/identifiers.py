"""The ids and headers both legs carry: the transfer id, the request-id sandwich vLLM parses
its peer's address from, the DP rank header, and the id a client sees instead."""

from __future__ import annotations

from .instance import Endpoint, Instance

DP_RANK_HEADER = "X-data-parallel-rank"
REQUEST_ID_HEADER = "X-Request-Id"


def new_transfer_id(nonce: str) -> str:
    """The id both legs share so P and D find each other's transfer; ``nonce`` is 32 hex
    digits, fresh per request (without it vLLM makes up a different one per leg)."""
    return "tx-" + nonce


def new_request_id(prefill: Instance, decode: Instance, nonce: str) -> str:
    """The X-Request-Id both legs carry; vLLM finds its peer by parsing it first.

    ``nonce`` must be 32 lowercase hex digits: vLLM's pattern ends with exactly that.
    """
    return f"___prefill_addr_{prefill.zmq_address}___decode_addr_{decode.zmq_address}_{nonce}"


def public_id(endpoint: Endpoint, suffix: str) -> str:
    """The response ``id`` a client sees: vLLM's prefix and the client's id, never the
    sandwich (which holds internal addresses)."""
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + suffix


def validate_dp_rank(rank: int, dp_size: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < dp_size:
        raise ValueError(f"DP rank {rank!r} outside 0..{dp_size - 1}")
    return rank
