"""The load generator's HTTP/1.1 client: keep-alive, one request at a time, bytes in, bytes out.

Why not aiohttp: on this 2-core machine the load generator shares the cores with the
target and the simulated instances, so every millisecond it spends per request is taken
from them. An ``asyncio.Protocol`` that writes pre-encoded request bytes and only looks
for the end of the response (Content-Length, or the last chunk of a chunked body) costs a
fraction of a client that parses headers into objects and yields each SSE line to a
coroutine (figures in bench/README.md). Checking the answer happens once, on the whole
body, after the response is complete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes  # de-chunked
    started: float  # time.monotonic() when the request was written
    first_byte: float  # when the first body byte arrived (``done`` for an empty body)
    done: float
    close: bool  # the server said "Connection: close": do not reuse this connection


def encode_request(
    host: str, port: int, path: str, body: bytes, headers: Mapping[str, str] | None = None
) -> bytes:
    """A complete POST request with a JSON body, ready to write as it is."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in the lower-cased header block."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def dechunk(buf: bytes | bytearray, pos: int) -> bytes | None:
    """The body of a chunked message starting at ``pos``; None while it is incomplete."""
    parts: list[bytes] = []
    size_end = buf.find(b"\r\n", pos)
    while size_end >= 0:
        size = int(bytes(buf[pos:size_end]).split(b";", 1)[0], 16)
        if size == 0:
            # No trailers from any server here: the message ends with an empty line.
            return b"".join(parts) if buf[size_end : size_end + 4] == b"\r\n\r\n" else None
        start = size_end + 2
        pos = start + size + 2
        if len(buf) < pos:
            return None
        parts.append(bytes(buf[start : start + size]))
        size_end = buf.find(b"\r\n", pos)
    return None


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` must not be called while one is in flight."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._buf = bytearray()
        self._body_at = -1  # offset of the body in _buf once the headers are in
        self._status = 0
        self._length: int | None = None
        self._chunked = False
        self._close = False
        self._started = 0.0
        self._first_byte = 0.0
        self.lost = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def request(self, data: bytes) -> asyncio.Future[Response]:
        """Write ``data``; the future resolves with the whole response (or ConnectionError)."""
        if self._transport is None or self.lost or self._transport.is_closing():
            raise ConnectionError("connection closed")
        self._buf.clear()
        self._body_at = -1
        self._first_byte = 0.0
        self._waiter = self._loop.create_future()
        self._started = time.monotonic()
        self._transport.write(data)
        return self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ----------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._body_at < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self._body_at = end + 4
            self._status = int(head[9:12])
            length = _header(head, b"content-length")
            self._length = int(length) if length is not None else None
            encoding = _header(head, b"transfer-encoding")
            self._chunked = encoding is not None and b"chunked" in encoding
            self._close = _header(head, b"connection") == b"close"
        if not self._first_byte and len(buf) > self._body_at:
            self._first_byte = time.monotonic()
        if self._length is not None:
            if len(buf) >= self._body_at + self._length:
                body = bytes(buf[self._body_at : self._body_at + self._length])
                self._finish(body)
        elif self._chunked and buf.endswith(b"0\r\n\r\n"):
            chunked = dechunk(buf, self._body_at)
            if chunked is not None:
                self._finish(chunked)
        # else: the body runs until the server closes (connection_lost finishes it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._body_at >= 0 and self._length is None and not self._chunked:
            self._close = True
            self._finish(bytes(self._buf[self._body_at :]))
            return
        waiter.set_exception(
            ConnectionError(
                "connection closed before the response ended"
                if self._buf
                else "connection closed before any response"
            )
        )

    def _finish(self, body: bytes) -> None:
        done = time.monotonic()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(
                Response(
                    self._status,
                    body,
                    self._started,
                    self._first_byte or done,
                    done,
                    self._close,
                )
            )
