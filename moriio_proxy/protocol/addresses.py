"""Instance addresses as vLLM sends them: ``IP:PORT`` (IPv6 unbracketed) and the MoRI-IO
``host:IP,handshake:PORT,notify:PORT`` string. A registered host ends up inside URLs and the
request-id sandwich, so only IP literals and DNS names get through."""

from __future__ import annotations

import re
from typing import Any


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
    return parse_host(host, address), parse_port(port, address)


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
        handshake = parse_port(parts["handshake"], text)
        notify = parse_port(parts["notify"], text)
    except KeyError as exc:
        raise ValueError(f"zmq_address {text!r} lacks {exc.args[0]!r}") from None
    return parse_host(host, text), handshake, notify


# An IP literal or a DNS name: a registered host is pasted into URLs and the request-id
# sandwich, so nothing that could change their meaning ("/", "@", "?", ",", "_") gets in.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}|[0-9A-Fa-f:.]{2,45}(%[A-Za-z0-9]{1,16})?")


def parse_host(host: str, context: str) -> str:
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"bad host {host!r} in {context!r}: expected an IP address or DNS name")
    return host


def parse_port(value: Any, context: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ValueError(f"bad port {value!r} in {context!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in {context!r}")
    return port
