"""The two legs' bodies and headers. A malformed leg does not fail one request on a real
cluster, it kills the vLLM engine, so every key the connector reads is built here once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .client import ClientRequest
from .identifiers import DP_RANK_HEADER, REQUEST_ID_HEADER, validate_dp_rank
from .instance import Endpoint, Instance, TransferMode


@dataclass(frozen=True)
class Leg:
    """One upstream call: where it goes, its JSON body and its headers."""

    url: str
    body: dict[str, Any]
    headers: dict[str, str]


def _path(endpoint: Endpoint) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def _peer_keys(peer: Instance) -> dict[str, Any]:
    """Explicit peer address and sizes; vLLM reads these when the id carries no sandwich."""
    return {
        "remote_host": peer.kv_host,
        "remote_handshake_port": peer.handshake_port,
        "remote_notify_port": peer.notify_port,
        "remote_dp_size": peer.dp_size,
        "remote_tp_size": peer.tp_size,
        "tp_size": peer.tp_size,
    }


def build_prefill_leg(
    request: ClientRequest,
    prefill: Instance,
    decode: Instance,
    *,
    transfer_id: str,
    request_id: str,
    dp_rank: int,
) -> Leg:
    """The prefill leg: one token, never streamed, no stop strings, KV kept for decode.

    ``remote_engine_id``/``remote_block_ids`` must exist as keys (null) or a WRITE-mode
    producer raises KeyError in the scheduler and the engine dies.
    """
    body = dict(request.body)  # top-level keys change; nested values are shared, never mutated
    body.pop("stream_options", None)  # vLLM 400s on stream_options without stream
    body.pop("stop", None)  # P's token is discarded; a stop there would null the params
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["min_tokens"] = 1  # suppresses EOS/stop tokens so P ends by the length cap
    body["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_id": transfer_id,
        "remote_engine_id": None,
        "remote_block_ids": None,
        **_peer_keys(decode),
    }
    headers = _headers(request, request_id)
    if prefill.dp_size > 1:
        headers[DP_RANK_HEADER] = str(validate_dp_rank(dp_rank, prefill.dp_size))
    return Leg(prefill.base_url + _path(request.endpoint), body, headers)


def _headers(request: ClientRequest, request_id: str) -> dict[str, str]:
    """Both legs' headers: the request id, and the client's key when it is passed through
    (a fleet key is the upstream session's, docs/protocol.md is silent on either)."""
    if request.authorization is None:
        return {REQUEST_ID_HEADER: request_id}
    return {REQUEST_ID_HEADER: request_id, "Authorization": request.authorization}


def build_decode_leg(
    request: ClientRequest,
    prefill: Instance,
    decode: Instance,
    *,
    mode: TransferMode,
    transfer_id: str,
    request_id: str,
    dp_rank: int,
    prefill_params: Mapping[str, Any] | None = None,
) -> Leg:
    """The decode leg: the client's body intact (stream, max_tokens: no decrement).

    READ forwards P's returned params as they are (nested block ids, string ports) and
    needs them; WRITE builds them, since both legs start together.
    """
    body = dict(request.body)  # only kv_transfer_params is replaced
    if mode == "READ":
        if prefill_params is None:
            raise ValueError("READ mode needs the prefill's kv_transfer_params")
        params = read_decode_params(prefill_params, prefill, transfer_id=transfer_id)
    else:
        params = write_decode_params(prefill, transfer_id=transfer_id, dp_rank=dp_rank)
    body["kv_transfer_params"] = params
    return Leg(decode.base_url + _path(request.endpoint), body, _headers(request, request_id))


def read_decode_params(
    prefill_params: Mapping[str, Any], prefill: Instance, *, transfer_id: str
) -> dict[str, Any]:
    params = dict(prefill_params)  # forwarded as returned: nested values untouched
    params["do_remote_decode"] = False
    params["do_remote_prefill"] = True
    params.setdefault("remote_host", prefill.kv_host)
    params.setdefault("remote_handshake_port", prefill.handshake_port)
    params.setdefault("remote_notify_port", prefill.notify_port)
    params.setdefault("transfer_id", transfer_id)
    return params


def write_decode_params(prefill: Instance, *, transfer_id: str, dp_rank: int) -> dict[str, Any]:
    """No ``remote_dp_rank_override``: with it an unpinned decode rank would never notify P."""
    return {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "transfer_id": transfer_id,
        "remote_engine_id": None,
        "remote_block_ids": None,
        **_peer_keys(prefill),
        "remote_dp_rank": validate_dp_rank(dp_rank, prefill.dp_size),
    }


def check_read_params(params: Any, transfer_id: str) -> str | None:
    """Why P's returned params cannot drive a READ decode, or None when they can.

    A READ consumer handed anything less does not recompute: it returns wrong text.
    """
    if not isinstance(params, Mapping):
        return "kv_transfer_params is not an object"
    if not params.get("remote_engine_id"):
        return "remote_engine_id is missing"
    blocks = params.get("remote_block_ids")
    if not isinstance(blocks, list) or not blocks:
        return "remote_block_ids is missing or empty"
    if not all(isinstance(group, list) for group in blocks):
        return "remote_block_ids is not a list of per-group lists"
    if not any(blocks):
        return "remote_block_ids holds no blocks"
    if params.get("transfer_id") not in (None, transfer_id):
        return "transfer_id differs from the one sent"
    return None
