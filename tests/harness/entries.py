"""Registry entries and admin instance views for tests, without a registry or sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

from moriio_proxy.protocol import Instance, Role
from moriio_proxy.registry import Entry
from moriio_proxy.views import InstanceView


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


def instance_view(role: Role = "P", port: int = 8100, **changes: Any) -> InstanceView:
    """A healthy READ instance as `/admin/instances` shows it, with ``changes`` applied."""
    base = InstanceView(
        role="P",
        http_address=f"10.0.0.2:{port}",
        zmq_address="host:10.0.0.2,handshake:6301,notify:61005",
        transfer_mode="READ",
        dp_size=1,
        tp_size=1,
        static=False,
        age_seconds=5.0,
        seconds_since_heartbeat=0.5,
        state="healthy",
        consecutive_failures=0,
        inflight=0,
        inflight_by_dp_rank=(0,),
    )
    return dataclasses.replace(base, role=role, **changes)
