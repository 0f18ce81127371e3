"""Registry entries for policy tests, without a registry or sockets."""

from __future__ import annotations

from moriio_proxy.protocol import Instance, Role
from moriio_proxy.registry import Entry


def entry(n: int, dp_size: int = 1, inflight: list[int] | None = None, role: Role = "P") -> Entry:
    instance = Instance(
        role=role,
        http_address=f"10.0.0.{n}:20005",
        kv_host=f"10.0.0.{n}",
        handshake_port=6301,
        notify_port=61005,
        dp_size=dp_size,
        tp_size=1,
        transfer_mode="READ",
    )
    made = Entry(instance, first_seen=0.0, last_seen=0.0)
    if inflight is not None:
        made.inflight = list(inflight)
    return made
