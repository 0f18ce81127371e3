"""ZMQ plumbing of a simulated instance: the per-DP-rank handshake and notify ROUTERs it
listens on, and the DEALERs it talks to peers with.

KV "transfers" between simulated instances are msgpack messages on these real ports, so a
wrong host, port or DP rank in a leg breaks them the way a wrong RDMA target would. The
transport knows sockets and message framing; what a message means is the engine's business
(it hands ``serve`` a callback).

Sockets to peers are long-lived, one per peer path, as 0.32 keeps its ``self.paths``: a
socket connect per KV read was the largest cost of a simulated decode. Requests that expect
an answer (the simulated RDMA read) carry a correlation frame the ROUTER echoes back, so
many reads share one socket.
"""

from __future__ import annotations

import asyncio
import itertools
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


class _Caller:
    """Request/reply with one peer ROUTER over one long-lived DEALER.

    Each request is sent as ``[key, *frames]``; the ROUTER echoes the frames between its
    identity frame and the payload, so the reply ``[key, *reply]`` finds its waiter. A reply
    that comes after its waiter gave up is dropped.
    """

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self._sock = sock
        self._pending: dict[bytes, asyncio.Future[list[bytes]]] = {}
        self._keys = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

    async def call(self, frames: list[bytes], timeout: float) -> list[bytes] | None:
        """The reply's frames, or None when none came within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        key = next(self._keys).to_bytes(8, "big")
        fut: asyncio.Future[list[bytes]] = loop.create_future()
        self._pending[key] = fut
        deadline = loop.time() + timeout
        try:
            # Unconnected peers queue messages up to the high-water mark, then block: the
            # send is bounded by the same deadline as the answer.
            await asyncio.wait_for(self._sock.send_multipart([key, *frames]), timeout)
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except (asyncio.TimeoutError, zmq.ZMQError):
            return None
        finally:
            self._pending.pop(key, None)

    async def _read(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart()
                fut = self._pending.pop(frames[0], None) if len(frames) >= 2 else None
                if fut is not None and not fut.done():
                    fut.set_result(frames[1:])
        except zmq.ZMQError:
            pass  # the socket or context was closed
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.cancel()

    def close(self) -> asyncio.Task[None] | None:
        """Stop reading and close the socket; returns the reader to await, if any."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        self._sock.close(linger=0)
        return reader


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
        self._callers: dict[str, _Caller] = {}
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
        readers = [r for r in self._close_callers() if r is not None]
        await asyncio.gather(*readers, return_exceptions=True)

    def _close_callers(self) -> list[asyncio.Task[None] | None]:
        callers, self._callers = list(self._callers.values()), {}
        return [c.close() for c in callers]

    def close(self) -> None:
        """Destroy the context and every socket in it (idempotent)."""
        self._close_callers()
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
            if reply is not None:  # echo the sender's envelope (a _Caller's key)
                await sock.send_multipart([ident, *frames[1:-1], pack(reply)])

    def _connect(self, host: str, port: int) -> zmq.asyncio.Socket:
        """A new DEALER connected to a peer's port."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if is_ipv6(host):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint(host, port))
        return sock

    def _dealer(self, host: str, port: int) -> zmq.asyncio.Socket:
        """A cached DEALER per peer path, like 0.32's ``self.paths``."""
        path = endpoint(host, port)
        sock = self._dealers.get(path)
        if sock is None:
            sock = self._dealers[path] = self._connect(host, port)
        return sock

    async def send_oneway(self, host: str, port: int, payload: dict[str, Any]) -> None:
        """Fire-and-forget notify (0.32 sends these without waiting for an answer)."""
        if self._ctx is None:
            return
        try:
            await self._dealer(host, port).send(pack(payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.error("%s failed to send %s to %s:%s: %s", self._tag, payload, host, port, e)

    async def call(self, host: str, port: int, payload: dict[str, Any]) -> Any:
        """Send a message that expects an answer over the peer path's long-lived DEALER.

        Returns the decoded answer, or None when nobody answered within transfer_timeout
        (or the answer was not msgpack).
        """
        if self._ctx is None:
            return None
        path = endpoint(host, port)
        caller = self._callers.get(path)
        if caller is None:
            try:
                caller = self._callers[path] = _Caller(self._connect(host, port))
            except zmq.ZMQError:
                return None
        reply = await caller.call([pack(payload)], self._config.transfer_timeout)
        return unpack(reply[-1]) if reply else None

    async def request(self, host: str, port: int, frames: list[bytes]) -> list[bytes] | None:
        """Request/reply on a fresh DEALER; None after transfer_timeout (nobody answered).

        For the handshake only (once per peer): its answer carries no correlation key.
        """
        try:
            sock = self._connect(host, port)
        except zmq.ZMQError:
            return None
        try:
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
