"""One vLLM instance as it announced itself, and the names of roles, modes and endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from .addresses import bracket_host, split_host_port

Role = Literal["P", "D"]
TransferMode = Literal["READ", "WRITE"]
Endpoint = Literal["completions", "chat"]
Scheme = Literal["http", "https"]

ROLES: tuple[Role, ...] = ("P", "D")
TRANSFER_MODES: tuple[TransferMode, ...] = ("READ", "WRITE")


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
    # Not in vLLM's heartbeat: the proxy's --upstream-scheme, or a static instance's
    # https:// request_address. The registry applies it (registry.py).
    scheme: Scheme = "http"

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
        return f"{self.scheme}://{bracket_host(host)}:{port}"
