"""Heartbeat maps (vLLM 0.32/0.33, and the older "register" shape) parsed into an Instance.

Anything a vLLM would not send is refused with a short reason the discovery listener counts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .addresses import parse_port, parse_zmq_address, split_host_port
from .instance import ROLES, TRANSFER_MODES, Instance, Role, Scheme, TransferMode

# Registration fields are small; anything larger is not a vLLM heartbeat.
_MAX_FIELD_LEN = 512
_MAX_PARALLEL = 4096


class RegistrationError(ValueError):
    """A discovery message that is not a usable registration. ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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
    scheme = _scheme(msg.get("scheme", "http"))
    return _instance(msg, msg["type"], http_address, kv_host, handshake, notify, scheme)


def _scheme(value: Any) -> Scheme:
    """vLLM sends no scheme; the workers' registry snapshots (discovery/mirror.py) do."""
    if value in ("http", "https"):
        return value  # type: ignore[no-any-return]
    raise RegistrationError("bad_field", f"scheme must be http or https, got {value!r}")


def _parse_gen1(msg: Mapping[str, Any]) -> Instance:
    role = msg.get("role")
    if role not in ROLES:
        raise RegistrationError("bad_field", f"role must be 'P' or 'D', got {role!r}")
    url = _text(msg, "request_address")
    match = re.fullmatch(r"(?:(https?)://)?(\[[^\]]+\]|[^/]+):(\d+)(?:/.*)?", url)
    if match is None:
        raise RegistrationError("bad_address", f"bad request_address {url!r}")
    scheme: Scheme = "https" if match.group(1) == "https" else "http"
    host = match.group(2).strip("[]")
    try:
        port = parse_port(match.group(3), url)
        handshake = parse_port(msg.get("handshake_port"), "handshake_port")
        notify = parse_port(msg.get("notify_port"), "notify_port")
    except ValueError as exc:
        raise RegistrationError("bad_address", str(exc)) from None
    return _instance(msg, role, f"{host}:{port}", host, handshake, notify, scheme)


def _instance(
    msg: Mapping[str, Any],
    role: Role,
    http_address: str,
    kv_host: str,
    handshake: int,
    notify: int,
    scheme: Scheme,
) -> Instance:
    """The Instance from one shape's addresses plus the fields both shapes carry alike
    (parallel sizes, transfer mode); those are checked last, so a bad address is the reason
    a message is refused for even when other fields are bad too."""
    return Instance(
        role=role,
        http_address=http_address,
        kv_host=kv_host,
        handshake_port=handshake,
        notify_port=notify,
        dp_size=_parallel(msg, "dp_size"),
        tp_size=_parallel(msg, "tp_size"),
        transfer_mode=_mode(msg),
        scheme=scheme,
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
