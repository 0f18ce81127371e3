"""ZMQ plumbing of a simulated instance: the per-DP-rank handshake and notify ROUTERs it
listens on, and the DEALERs it talks to peers with.

KV "transfers" between simulated instances are msgpack messages on these real ports, so a
wrong host, port or DP rank in a leg breaks them the way a wrong RDMA target would. The
transport knows sockets and message framing; what a message means is the engine's business
(it hands ``serve`` a callback).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import zmq
import zmq.asyncio

from .connector import Advertised
from .settings import SimConfig

logger = logging.getLogger(__name__)

GET_META_MSG = b"get_meta_msg"  # MoRIIOConstants.GET_META_MSG: a handshake request
_AUTO_PORT_LOW = 20_000  # below Linux's ephemeral range (32768-60999): no TCP self-connect
_AUTO_PORT_HIGH = 32_000

#: Handles one decoded notify message on a DP rank; returns a reply or None.
NotifyHandler = Callable[[int, dict[str, Any]], "dict[str, Any] | None"]


class NotifyListenerDied(Exception):
    """0.32's notify listener thread raises on this message and stops listening."""


def pack(message: Any) -> bytes:
    """msgpack, the encoding of every MoRI-IO control message and heartbeat."""
    data: bytes = msgpack.packb(message)
    return data


def unpack(data: bytes) -> Any:
    """Decode msgpack; None for bytes that are not msgpack (a peer's garbage)."""
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception:
        return None


def is_ipv6(host: str) -> bool:
    return ":" in host


def endpoint(host: str, port: int) -> str:
    """A ZMQ tcp endpoint; IPv6 hosts are bracketed."""
    if is_ipv6(host) and not host.startswith("["):
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


class Transport:
    """The ZMQ context and sockets of one instance (all its DP ranks)."""

    def __init__(self, config: SimConfig, tag: str) -> None:
        self._config = config
        self._tag = tag
        self._ctx: zmq.asyncio.Context | None = None
        self._hs_base = config.handshake_port
        self._notify_base = config.notify_port
        self._notify_socks: list[zmq.asyncio.Socket] = []
        self._handshake_socks: list[zmq.asyncio.Socket] = []
        self._listeners: list[asyncio.Task[None]] = []
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._handshaken: set[str] = set()
        self._rng = random.Random()

    @property
    def handshake_base(self) -> int:
        return self._hs_base

    @property
    def notify_base(self) -> int:
        return self._notify_base

    @property
    def advertised(self) -> Advertised:
        cfg = self._config
        return Advertised(cfg.host, self._hs_base, self._notify_base, cfg.dp_size, cfg.tp_size)

    @property
    def context(self) -> zmq.asyncio.Context:
        assert self._ctx is not None, "transport not open"
        return self._ctx

    def bind(self) -> None:
        """Bind the notify and handshake ROUTERs of every DP rank."""
        self._ctx = zmq.asyncio.Context()
        self._notify_base, self._notify_socks = self._bind_group(self._config.notify_port)
        self._hs_base, self._handshake_socks = self._bind_group(self._config.handshake_port)

    def _bind_group(self, base: int) -> tuple[int, list[zmq.asyncio.Socket]]:
        """Bind dp_size consecutive ROUTERs at base+rank (0.32: base + get_port_offset).

        With base 0, pick a random base below the ephemeral range and retry on conflicts:
        binding is the only race-free test that the ports are free.
        """
        n = self._config.dp_size
        attempts = 1 if base else 200
        last_error: Exception | None = None
        for _ in range(attempts):
            b = base or self._rng.randint(_AUTO_PORT_LOW, _AUTO_PORT_HIGH - n)
            socks: list[zmq.asyncio.Socket] = []
            try:
                for r in range(n):
                    sock = self.context.socket(zmq.ROUTER)
                    sock.setsockopt(zmq.LINGER, 0)
                    if is_ipv6(self._config.host):
                        sock.setsockopt(zmq.IPV6, 1)
                    socks.append(sock)
                    sock.bind(endpoint(self._config.host, b + r))
                return b, socks
            except zmq.ZMQError as e:
                last_error = e
                for s in socks:
                    s.close(linger=0)
        raise OSError(f"{self._tag}: cannot bind {n} ports from base {base}: {last_error}")

    def serve(self, on_notify: NotifyHandler) -> None:
        """Start answering handshakes and handing notify messages to ``on_notify``."""
        for rank, sock in enumerate(self._notify_socks):
            self._listeners.append(asyncio.ensure_future(self._notify_loop(rank, sock, on_notify)))
        for rank, sock in enumerate(self._handshake_socks):
            self._listeners.append(asyncio.ensure_future(self._handshake_loop(rank, sock)))

    async def stop_serving(self) -> None:
        """Stop listening and close the rank sockets (a dead engine hears nothing more)."""
        for t in self._listeners:
            t.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        for sock in (*self._notify_socks, *self._handshake_socks):
            sock.close(linger=0)

    def close(self) -> None:
        """Destroy the context and every socket in it (idempotent)."""
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def _handshake_loop(self, rank: int, sock: zmq.asyncio.Socket) -> None:
        """Answer MoRI handshakes (GET_META_MSG) on handshake_base + rank."""
        while True:
            frames = await sock.recv_multipart()
            if len(frames) >= 2 and frames[-1] == GET_META_MSG:
                meta = {
                    "engine_id": self.advertised.engine_id,
                    "dp_rank": rank,
                    "role": self._config.role,
                }
                await sock.send_multipart([frames[0], b"", pack(meta)])

    async def _notify_loop(
        self, rank: int, sock: zmq.asyncio.Socket, on_notify: NotifyHandler
    ) -> None:
        """The notify listener on notify_base + rank (0.32 MoRIIOWrapper._handle_message)."""
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            ident, msg = frames[0], frames[-1]
            data = unpack(msg)
            if not isinstance(data, dict):
                logger.warning("%s rank %d: unhandled notify message %r", self._tag, rank, msg)
                continue
            try:
                reply = on_notify(rank, data)
            except NotifyListenerDied as e:
                # 0.32 raises in the listener thread, which dies: this rank hears no more.
                logger.error(
                    "%s rank %d notify listener died: %s (0.32 behaviour; no more "
                    "notifications are processed on this rank)",
                    self._tag,
                    rank,
                    e,
                )
                return
            if reply is not None:
                await sock.send_multipart([ident, pack(reply)])

    def _dealer(self, host: str, port: int) -> zmq.asyncio.Socket:
        """A cached DEALER per peer path, like 0.32's ``self.paths``."""
        path = endpoint(host, port)
        sock = self._dealers.get(path)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if is_ipv6(host):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(path)
            self._dealers[path] = sock
        return sock

    async def send_oneway(self, host: str, port: int, payload: dict[str, Any]) -> None:
        """Fire-and-forget notify (0.32 sends these without waiting for an answer)."""
        if self._ctx is None:
            return
        try:
            await self._dealer(host, port).send(pack(payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.error("%s failed to send %s to %s:%s: %s", self._tag, payload, host, port, e)

    async def request(self, host: str, port: int, frames: list[bytes]) -> list[bytes] | None:
        """Request/reply on a fresh DEALER; None after transfer_timeout (nobody answered)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if is_ipv6(host):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(endpoint(host, port))
            await sock.send_multipart(frames)
            reply: list[bytes] = await asyncio.wait_for(
                sock.recv_multipart(), self._config.transfer_timeout
            )
            return reply
        except (asyncio.TimeoutError, zmq.ZMQError):
            return None
        finally:
            sock.close(linger=0)

    async def handshake(self, host: str, port: int) -> bool:
        """MoRI handshake with a peer rank (cached on success, like 0.32's _remote_agents)."""
        path = endpoint(host, port)
        if path in self._handshaken:
            return True
        reply = await self.request(host, port, [GET_META_MSG])
        if reply is None or len(reply) != 2 or reply[0] != b"":
            logger.warning(
                "%s MoRIIO handshake with %s got no answer within %.1fs",
                self._tag,
                path,
                self._config.transfer_timeout,
            )
            return False
        self._handshaken.add(path)
        return True
