"""The ZMQ ROUTER that vLLM's MoRI-IO heartbeats reach, and the sweeper that evicts silence.

The listener is the proxy's only unauthenticated input from the network, so it must
survive any bytes: every frame is judged by ``accept()``, which counts and (rate-limited)
logs what it refuses and never raises.

This module is ``moriio_proxy.discovery.zmq``; ``import zmq`` below is pyzmq (imports are
absolute), never this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Sequence

import msgpack
import zmq
import zmq.asyncio

from ..config import Network
from ..metrics import Metrics
from ..protocol import Instance, RegistrationError, parse_registration
from ..registry import Registry
from .base import DiscoverySource

log = logging.getLogger(__name__)

# A vLLM heartbeat is ~250 bytes; a peer sending more than this is cut off by libzmq.
MAX_MESSAGE_BYTES = 64 * 1024

# How to fix a mode conflict between heartbeats (ends the REFUSED line).
_REMEDY = "P and D must use the same kv_connector_extra_config read_mode"


class Discovery(DiscoverySource):
    """Feeds the registry from heartbeats (and static config), evicts silent instances."""

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        allow: Sequence[Network] = (),
        static: Sequence[Instance] = (),
    ) -> None:
        super().__init__(registry, metrics, static=static, logger=log)
        self.host = host
        self.port = port
        self.allow = tuple(allow)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        self.register_static()
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if self.port == 0:
                # Below Linux's ephemeral range, so no reconnecting DEALER can hold it.
                self.bound_port = sock.bind_to_random_port(
                    f"tcp://{host}", min_port=20000, max_port=32767
                )
            else:
                sock.bind(f"tcp://{host}:{self.port}")
                self.bound_port = self.port
        except zmq.ZMQError as exc:
            sock.close()
            self._ctx.term()
            raise OSError(
                f"cannot bind the discovery port {self.host}:{self.port}: {exc}. Another "
                "process (or a vLLM heartbeat that self-connected to this ephemeral-range "
                "port) holds it; see the README's 'port trap' note"
            ) from None
        self._sock = sock
        self._tasks.spawn(self._listen(), name="discovery-listen")
        self._tasks.spawn(self._sweep(), name="discovery-sweep")
        everywhere = " (every interface)" if every_interface(self.host) else ""
        log.info("discovery listening on tcp://%s:%s%s", host, self.bound_port, everywhere)

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _listen(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frames = await self._sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the listener die
                self._log(logging.ERROR, "recv", "discovery receive failed: %r", exc)
                await asyncio.sleep(0.1)
                continue
            peer = _peer_address(frames[-1]) if frames else None
            self.accept([bytes(f.buffer) for f in frames], peer)

    def accept(self, frames: list[bytes], peer: str | None = None) -> str:
        """Judge one ROUTER message ``[identity, payload]``; return what became of it."""
        try:
            return self._accept(frames, peer)
        except Exception as exc:  # a bug here must not stop discovery
            return self._reject("internal_error", f"{exc!r}", peer)

    def _accept(self, frames: list[bytes], peer: str | None) -> str:
        if self.allow and not _allowed(peer, self.allow):
            return self._reject("not_allowed", "source address not in --discovery-allow", peer)
        if len(frames) != 2:
            return self._reject("bad_frames", f"expected 2 frames, got {len(frames)}", peer)
        try:
            message = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
        except Exception as exc:
            return self._reject("bad_msgpack", type(exc).__name__, peer)
        try:
            instance = parse_registration(message)
        except RegistrationError as exc:
            return self._reject(exc.reason, str(exc), peer)
        return self._upsert(instance, static=False, remedy=_REMEDY)

    def _reject(self, reason: str, detail: str, peer: str | None) -> str:
        self.metrics.registrations_rejected.labels(reason).inc()
        self._log(
            logging.WARNING,
            reason,
            "discovery message rejected (%s) from %s: %s",
            reason,
            peer or "unknown peer",
            detail[:200],
        )
        return reason

    async def _sweep(self) -> None:
        interval = min(1.0, self.registry.ttl / 4)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                self.registry.sweep()


def every_interface(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (0.0.0.0, ::, or ZMQ's *)."""
    if host.strip() in ("*", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


def _peer_address(frame: zmq.Frame) -> str | None:
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None
    return address if isinstance(address, str) else None


def _allowed(peer: str | None, networks: Sequence[Network]) -> bool:
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)
