"""Discovery heartbeats: how a simulated instance announces itself to the proxy, as 0.32 does.

vLLM 0.32 (moriio_heartbeat.py) sends the same msgpack map over a ZMQ DEALER every interval,
with no HELLO and no goodbye; the proxy learns of a departure only when the map stops coming.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from .settings import SimConfig
from .transport import is_ipv6, pack

logger = logging.getLogger(__name__)


def registration(
    role: str, mode: str, http_address: str, zmq_address: str, dp_size: int, tp_size: int
) -> dict[str, Any]:
    """The exact heartbeat map vLLM 0.32 sends (moriio_connector.py _start_heartbeat).

    The key order is part of the contract: tests compare it with the real one.
    """
    return {
        "type": role,
        "http_address": http_address,
        "zmq_address": zmq_address,
        "dp_size": dp_size,
        "tp_size": tp_size,
        "transfer_mode": mode,
    }


def _proxy_endpoint(proxy: str) -> tuple[str, bool]:
    """``HOST:PORT`` (IPv6 bracketed or not) -> (tcp endpoint, is IPv6)."""
    host, _, port = proxy.rpartition(":")
    if is_ipv6(host) and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}", host.startswith("[")


async def heartbeat_loop(
    ctx: zmq.asyncio.Context,
    proxy: str,
    config: SimConfig,
    message: Callable[[], dict[str, Any] | None],
    tag: str,
) -> None:
    """DEALER, LINGER 0, SNDTIMEO 1 s, ``message()`` every ``config.heartbeat_interval``
    (read each time: tests retune a running instance); ``message()`` None skips a beat.

    A send that would block is dropped with a warning. With no proxy listening the DEALER
    queues up to its HWM (1000), which a late proxy receives.
    """
    address, ipv6 = _proxy_endpoint(proxy)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(address)
    try:
        while True:
            beat = message()
            if beat is not None:
                try:
                    await sock.send(pack(beat), flags=zmq.NOBLOCK)
                except zmq.Again:
                    logger.warning("%s discovery heartbeat send failed; retrying", tag)
                except zmq.ZMQError:
                    logger.exception("%s discovery heartbeat send failed", tag)
            await asyncio.sleep(config.heartbeat_interval)
    finally:
        sock.close(linger=0)
