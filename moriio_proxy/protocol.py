"""The MoRI-IO P/D wire contract as pure functions.

Everything here is data in, data out: no sockets, no asyncio, no clocks. A malformed leg
does not fail one request on a real cluster, it kills the vLLM engine, so every key the
connector reads is built in exactly one place and is unit-tested without a network.
See ``shared/docs/protocol.md`` for the contract and vLLM 0.32's ``moriio`` connector
for the final word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

Role = Literal["P", "D"]
TransferMode = Literal["READ", "WRITE"]
Endpoint = Literal["completions", "chat"]

ROLES: tuple[Role, ...] = ("P", "D")
TRANSFER_MODES: tuple[TransferMode, ...] = ("READ", "WRITE")
DP_RANK_HEADER = "X-data-parallel-rank"
REQUEST_ID_HEADER = "X-Request-Id"

# Registration fields are small; anything larger is not a vLLM heartbeat.
_MAX_FIELD_LEN = 512
_MAX_PARALLEL = 4096


class RegistrationError(ValueError):
    """A discovery message that is not a usable registration. ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class RequestError(ValueError):
    """A client request the proxy refuses before any upstream call (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Instance:
    """One vLLM instance as it announced itself; both registration generations map here."""

    role: Role
    http_address: str  # "IP:PORT" as vLLM sends it (an IPv6 host arrives unbracketed)
    kv_host: str  # the host of its MoRI-IO handshake/notify sockets
    handshake_port: int  # base port
    notify_port: int  # base port
    dp_size: int
    tp_size: int
    transfer_mode: TransferMode

    @property
    def key(self) -> tuple[Role, str]:
        return (self.role, self.http_address)

    @property
    def zmq_address(self) -> str:
        """The string both legs' request-id sandwich embeds; vLLM parses it back."""
        return f"host:{self.kv_host},handshake:{self.handshake_port},notify:{self.notify_port}"

    @cached_property
    def base_url(self) -> str:
        """Computed once per instance: every leg's URL starts with it."""
        host, port = split_host_port(self.http_address)
        return f"http://{bracket_host(host)}:{port}"


# --------------------------------------------------------------------------- addresses


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``IP:PORT`` on the LAST colon, since vLLM sends IPv6 hosts unbracketed."""
    text = address.strip()
    if text.startswith("["):  # tolerate "[::1]:8000" from hand-written config
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {address!r}: expected [HOST]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {address!r}: expected HOST:PORT")
    return _host(host, address), _port(port, address)


def bracket_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_zmq_address(text: str) -> tuple[str, int, int]:
    """Parse ``host:IP,handshake:PORT,notify:PORT`` the way vLLM 0.32 does (first colon)."""
    parts: dict[str, str] = {}
    for segment in text.split(","):
        key, _, value = segment.partition(":")
        parts[key.strip()] = value.strip()
    try:
        host = parts["host"]
        handshake = _port(parts["handshake"], text)
        notify = _port(parts["notify"], text)
    except KeyError as exc:
        raise ValueError(f"zmq_address {text!r} lacks {exc.args[0]!r}") from None
    return _host(host, text), handshake, notify


# An IP literal or a DNS name: a registered host is pasted into URLs and the request-id
# sandwich, so nothing that could change their meaning ("/", "@", "?", ",", "_") gets in.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}|[0-9A-Fa-f:.]{2,45}(%[A-Za-z0-9]{1,16})?")


def _host(host: str, context: str) -> str:
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"bad host {host!r} in {context!r}: expected an IP address or DNS name")
    return host


def _port(value: Any, context: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ValueError(f"bad port {value!r} in {context!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in {context!r}")
    return port


# ----------------------------------------------------------------------- registration


def parse_registration(message: Any) -> Instance:
    """Normalise a heartbeat map (vLLM 0.32, or the older "register" shape) to an Instance.

    Raises RegistrationError with a short ``reason`` for anything a vLLM would not send;
    the discovery listener counts those and carries on.
    """
    if not isinstance(message, Mapping):
        raise RegistrationError("not_a_map", f"expected a map, got {type(message).__name__}")
    kind = message.get("type")
    if kind in ROLES:
        return _parse_gen2(message)
    if kind == "register":
        return _parse_gen1(message)
    raise RegistrationError("unknown_type", f"unknown registration type {kind!r}")


def _parse_gen2(msg: Mapping[str, Any]) -> Instance:
    http_address = _text(msg, "http_address")
    zmq_address = _text(msg, "zmq_address")  # outside the try: RegistrationError is a ValueError
    try:
        split_host_port(http_address)
        kv_host, handshake, notify = parse_zmq_address(zmq_address)
    except ValueError as exc:
        raise RegistrationError("bad_address", str(exc)) from None
    return Instance(
        role=msg["type"],
        http_address=http_address,
        kv_host=kv_host,
        handshake_port=handshake,
        notify_port=notify,
        dp_size=_parallel(msg, "dp_size"),
        tp_size=_parallel(msg, "tp_size"),
        transfer_mode=_mode(msg),
    )


def _parse_gen1(msg: Mapping[str, Any]) -> Instance:
    role = msg.get("role")
    if role not in ROLES:
        raise RegistrationError("bad_field", f"role must be 'P' or 'D', got {role!r}")
    url = _text(msg, "request_address")
    match = re.fullmatch(r"(?:https?://)?(\[[^\]]+\]|[^/]+):(\d+)(?:/.*)?", url)
    if match is None:
        raise RegistrationError("bad_address", f"bad request_address {url!r}")
    host = match.group(1).strip("[]")
    try:
        port = _port(match.group(2), url)
        handshake = _port(msg.get("handshake_port"), "handshake_port")
        notify = _port(msg.get("notify_port"), "notify_port")
    except ValueError as exc:
        raise RegistrationError("bad_address", str(exc)) from None
    return Instance(
        role=role,
        http_address=f"{host}:{port}",
        kv_host=host,
        handshake_port=handshake,
        notify_port=notify,
        dp_size=_parallel(msg, "dp_size"),
        tp_size=_parallel(msg, "tp_size"),
        transfer_mode=_mode(msg),
    )


def _text(msg: Mapping[str, Any], key: str) -> str:
    value = msg.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value or len(value) > _MAX_FIELD_LEN:
        raise RegistrationError("bad_field", f"{key} must be a non-empty string")
    return value


def _parallel(msg: Mapping[str, Any], key: str) -> int:
    value = msg.get(key, 1)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_PARALLEL:
        raise RegistrationError("bad_field", f"{key} must be an integer >= 1, got {value!r}")
    return value


def _mode(msg: Mapping[str, Any]) -> TransferMode:
    mode = msg.get("transfer_mode")
    if isinstance(mode, str) and mode.upper() in TRANSFER_MODES:
        return mode.upper()  # type: ignore[return-value]
    raise RegistrationError("bad_field", f"transfer_mode must be READ or WRITE, got {mode!r}")


# ------------------------------------------------------------------------- identifiers


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


# ----------------------------------------------------------------------- client request


@dataclass(frozen=True)
class ClientRequest:
    """A validated client body and what the proxy needs to know about it."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    model: str | None


def parse_client_request(endpoint: Endpoint, body: Any) -> ClientRequest:
    """Refuse what cannot safely become ONE prefill/decode pair.

    A list of prompts or ``n > 1`` would make several engine requests share one
    ``transfer_id`` (broken transfers, WRITE decodes that wait forever), so they get a
    clear 400 instead of being forwarded.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
    else:
        _check_single_prompt(body.get("prompt", _MISSING))
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise RequestError(
            "n != 1 is not supported through a prefill/decode proxy: each choice would "
            "need its own KV transfer; send n separate requests",
            "n",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    # Checked here, not left to the decode engine: the prefill leg (one token, no stream
    # options) would pass, and in READ mode its KV would sit on P until defer_timeout.
    if options and stream is not True:
        raise RequestError(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"'{key}' must be an integer", key)
        if value is not None and value < 1:
            raise RequestError(f"'{key}' must be at least 1, got {value}", key)
    model = body.get("model")
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        model=model if isinstance(model, str) else None,
    )


_MISSING = object()


def _check_single_prompt(prompt: Any) -> None:
    if prompt is _MISSING or prompt is None:
        raise RequestError("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return  # one tokenised prompt
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return
        raise RequestError(
            "a list of prompts is not supported through a prefill/decode proxy: each "
            "prompt needs its own KV transfer; send one request per prompt",
            "prompt",
        )
    raise RequestError("'prompt' must be a string or a list of token ids", "prompt")


# -------------------------------------------------------------------------- the legs


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
    headers = {REQUEST_ID_HEADER: request_id}
    if prefill.dp_size > 1:
        headers[DP_RANK_HEADER] = str(validate_dp_rank(dp_rank, prefill.dp_size))
    return Leg(prefill.base_url + _path(request.endpoint), body, headers)


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
    return Leg(decode.base_url + _path(request.endpoint), body, {REQUEST_ID_HEADER: request_id})


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


# ------------------------------------------------------------------------ the answers


def rewrite_id(payload: dict[str, Any], new_id: str) -> dict[str, Any]:
    """Replace vLLM's ``id`` (which embeds the sandwich) and drop internal KV params."""
    if "id" in payload:
        payload["id"] = new_id
    payload.pop("kv_transfer_params", None)
    return payload


def prefill_as_answer(
    payload: dict[str, Any], endpoint: Endpoint, include_usage: bool
) -> list[dict[str, Any]]:
    """P's complete answer (it ended before the length cap) as streaming chunks.

    When P's one token finished the request there is nothing for D to continue, and a
    streaming client still deserves a well-formed SSE answer.
    """
    base: dict[str, Any] = {k: payload[k] for k in ("id", "created", "model") if k in payload}
    chunks: list[dict[str, Any]] = []
    for choice in payload.get("choices") or []:
        index = choice.get("index", 0)
        extra = {"finish_reason": choice.get("finish_reason"), "index": index}
        if endpoint == "chat":
            message = choice.get("message") or {}
            role_chunk = {"index": index, "delta": {"role": "assistant", "content": ""}}
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [role_chunk]})
            delta = {"content": message.get("content") or ""}
            chunk_choice = {**extra, "delta": delta, "logprobs": None}
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [chunk_choice]})
        else:
            chunk_choice = {
                **extra,
                "text": choice.get("text") or "",
                "logprobs": None,
                "stop_reason": choice.get("stop_reason"),
            }
            chunks.append({**base, "object": "text_completion", "choices": [chunk_choice]})
    if include_usage and payload.get("usage") is not None:
        kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        chunks.append({**base, "object": kind, "choices": [], "usage": payload["usage"]})
    return chunks


def error_body(
    message: str, status: int, err_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """vLLM's error shape, so clients and SDKs parse proxy errors like engine errors."""
    return {
        "error": {
            "message": message,
            "type": err_type or _ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def error_message(payload: Any) -> str | None:
    """The human sentence inside an error answer, or None when it has none.

    vLLM and the proxy send ``{"error": {"message": ...}}``; older servers and other
    frameworks send ``{"error": "..."}`` or ``{"message": "..."}``, and the proxy's /ready
    says why it is not ready in ``{"reason": "..."}``. Whoever reports a failed call (the
    upstream client, ``check``) wants that sentence rather than the raw body.
    """
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    for key in ("message", "reason"):
        if isinstance(payload.get(key), str):
            return str(payload[key])
    return None


_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestEntityTooLarge",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
