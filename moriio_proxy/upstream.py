"""Talking to vLLM instances: one pooled aiohttp session, bounded waits, typed failures.

Every way an upstream call can go wrong becomes one UpstreamError subclass, so the
orchestration above decides status codes and retries from types, not from exception text.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .compat import timeout_after
from .protocol import Leg, error_message

# A vLLM SSE line with logprobs can be large; aiohttp caps a line at twice this.
_READ_BUFSIZE = 1 << 20


class UpstreamError(Exception):
    """An upstream call that failed. ``kind`` is a metric label and picks the HTTP status."""

    kind = "error"
    status = 502

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.url = url


class UpstreamConnectError(UpstreamError):
    """The instance could not be reached (refused, unreachable, connect timeout)."""

    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamProtocolError(UpstreamError):
    """The instance answered with something that is not what vLLM sends, or hung up."""

    kind = "protocol"


class UpstreamKvLoadError(UpstreamError):
    """A decode that failed the request because its KV cache never arrived (vLLM 0.33
    WRITE mode, docs/protocol.md §7.6): nothing was generated, so another pair may serve."""

    kind = "kv_load"


class UpstreamStatusError(UpstreamError):
    """The instance answered with an HTTP error; ``payload`` is its parsed body, if any."""

    kind = "status"

    def __init__(self, message: str, *, url: str, status: int, payload: Any) -> None:
        super().__init__(message, url=url)
        self.status = status
        self.payload = payload


@dataclass(frozen=True)
class Timeouts:
    connect: float
    prefill: float
    first_byte: float
    idle: float


class Upstream:
    """Owns the app's single ClientSession (created on startup, closed on shutdown)."""

    def __init__(
        self,
        timeouts: Timeouts,
        *,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeouts = timeouts
        # Sent with every call (the session's default headers): the fleet key, built once.
        self.headers = dict(headers or {})
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection cap: a cap shared by both legs of every request can deadlock
        # (all slots held by decodes waiting for prefills that cannot get a slot).
        # Idle pooled connections are dropped before vLLM's own keep-alive (uvicorn, 5 s)
        # closes them, so reuse rarely races a server-side close; _post covers the rest.
        # ``ssl`` only applies to https:// instances (README: Security, TLS).
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=3, ssl=self._ssl
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            read_bufsize=_READ_BUFSIZE,
            auto_decompress=True,
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() has not run")
        return self._session

    async def get_json(
        self, url: str, timeout: float, headers: dict[str, str] | None = None
    ) -> Any:
        """A small GET (model lists); the whole call bounded by ``timeout``."""
        client_timeout = aiohttp.ClientTimeout(total=timeout, connect=self.timeouts.connect)
        with _Failures(url, "did not answer", timeout):
            async with self.session.get(url, timeout=client_timeout, headers=headers) as resp:
                return await _json_or_raise(resp, url)

    async def _post(self, leg: Leg, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """POST and return the response head. A pooled connection the server had already
        closed fails before the request reached it, so that one case is sent again once."""
        data = orjson.dumps(leg.body)
        headers = {**leg.headers, "Content-Type": "application/json"}
        try:
            return await self.session.post(leg.url, data=data, headers=headers, timeout=timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not _stale_connection(exc):
                raise
        return await self.session.post(leg.url, data=data, headers=headers, timeout=timeout)

    async def post(self, leg: Leg, limit: float, deadline: float | None = None) -> bytes:
        """POST a non-streaming leg and return its body, which is JSON (an error status
        raises); the whole call is bounded by ``limit`` and by what is left until
        ``deadline`` (monotonic)."""
        timeout = _limit(limit, deadline)
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=self.timeouts.connect, sock_connect=self.timeouts.connect
        )
        with _Failures(leg.url, "did not answer", timeout):
            resp = await self._post(leg, client_timeout)
            try:
                return await _read_or_raise(resp, leg.url)
            finally:
                resp.release()

    async def post_json(
        self, leg: Leg, limit: float, deadline: float | None = None
    ) -> dict[str, Any]:
        """``post`` and parse: the leg's JSON object."""
        raw = await self.post(leg, limit, deadline)
        return parse_object(raw, leg.url)

    async def open_stream(self, leg: Leg, deadline: float | None = None) -> Stream:
        """Send a streaming leg and return its body once the status is known to be 200.

        The caller owns the stream and must ``close()`` it; closing it early is how a
        vLLM request is aborted.
        """
        client_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeouts.connect,
            sock_connect=self.timeouts.connect,
            sock_read=None,
        )
        limit = _limit(self.timeouts.first_byte, deadline)
        with _Failures(leg.url, "sent no response", limit):
            async with timeout_after(limit):
                resp = await self._post(leg, client_timeout)
        if resp.status != 200:
            try:
                await _read_or_raise(resp, leg.url)
            finally:
                resp.release()
            raise UpstreamProtocolError(f"{leg.url} answered HTTP {resp.status}", url=leg.url)
        return Stream(resp, leg.url, self.timeouts, deadline)

    @staticmethod
    def abort(stream: Stream) -> None:
        """Drop a stream nobody will read; closing its connection aborts the vLLM request."""
        stream.close()


class Stream:
    """A streaming response's body as it arrives, every wait bounded.

    The first piece must come within the first-byte limit, each later one within the
    idle limit, none after the request's deadline. A relayed answer is read dozens of
    times per request, so the bound is one lazily re-armed timer per stream rather than a
    timer per read: a read only notes when it started waiting, and the timer, when it
    fires, either finds the wait overdue and fails the read (with UpstreamTimeout, through
    the body's own exception slot) or re-arms itself for when it would be. Time spent not
    waiting (writing to a slow client) never counts as upstream silence.
    """

    def __init__(
        self, resp: aiohttp.ClientResponse, url: str, timeouts: Timeouts, deadline: float | None
    ) -> None:
        self.url = url
        self._resp = resp
        self._content = resp.content
        self._loop = asyncio.get_running_loop()
        self._limit = timeouts.first_byte
        self._idle = timeouts.idle
        self._deadline = deadline  # time.monotonic(), the clock asyncio's loop.time() reads
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    async def read(self) -> bytes:
        """The next piece of the body, b"" at its end; pieces may split lines and events."""
        since = self._waiting_since = self._loop.time()
        if self._timer is None or self._due > since + self._limit:
            self._arm(since + self._limit)  # first read, or the idle limit is the shorter
        try:
            chunk = await self._content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamProtocolError(
                f"{self.url} broke the stream: {type(exc).__name__}", url=self.url
            ) from None
        finally:
            self._waiting_since = None
        self._limit = self._idle
        return chunk

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._resp.close()

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._deadline is not None:
            due = min(due, self._deadline)
        self._due = due
        self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._expire("the request deadline passed")
        elif self._waiting_since is None:
            if self._deadline is not None:
                self._arm(self._deadline)  # the next read() arms the silence check
        elif now - self._waiting_since >= self._limit:
            self._expire(f"nothing for {self._limit:g}s")
        else:
            self._arm(self._waiting_since + self._limit)

    def _expire(self, why: str) -> None:
        self._content.set_exception(
            UpstreamTimeout(f"{self.url} stream stalled: {why}", url=self.url)
        )


async def _json_or_raise(resp: aiohttp.ClientResponse, url: str) -> Any:
    raw = await _read_or_raise(resp, url)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(
            f"{url} answered HTTP {resp.status} without JSON", url=url
        ) from None


async def _read_or_raise(resp: aiohttp.ClientResponse, url: str) -> bytes:
    """The whole body; an HTTP error status raises with the instance's own message."""
    try:
        raw = await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamProtocolError(
            f"{url} broke the response: {type(exc).__name__}", url=url
        ) from None
    if resp.status >= 400:
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = None
        message = error_message(payload) or f"{url} answered HTTP {resp.status}"
        raise UpstreamStatusError(message, url=url, status=resp.status, payload=payload)
    if not raw:
        raise UpstreamProtocolError(f"{url} answered HTTP {resp.status} without JSON", url=url)
    return raw


def parse_object(raw: bytes, url: str) -> dict[str, Any]:
    """A JSON object from an instance; anything else is a protocol error."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{url} answered without JSON", url=url) from None
    if not isinstance(payload, dict):
        raise UpstreamProtocolError(f"{url} answered a non-object", url=url)
    return payload


def _limit(limit: float, deadline: float | None) -> float:
    """The smaller of a per-step limit and what is left of the request's deadline.

    Never 0: aiohttp reads a zero timeout as "no timeout at all".
    """
    if deadline is None:
        return limit
    return max(0.001, min(limit, deadline - time.monotonic()))


def _stale_connection(exc: aiohttp.ClientError) -> bool:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
        and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )


class _Failures:
    """Turns what aiohttp and the clock raise during one call into the ``UpstreamError``
    the callers classify: a connection failure by its kind, a timeout with what did not
    happen within how long. A class rather than a generator context manager: it runs for
    every leg, and this costs no generator per call."""

    __slots__ = ("missing", "seconds", "url")

    def __init__(self, url: str, missing: str, seconds: float) -> None:
        self.url = url
        self.missing = missing  # what did not happen in time: "did not answer", ...
        self.seconds = seconds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        if isinstance(exc, aiohttp.ClientConnectionError):
            raise _connection_error(exc, self.url) from None
        if isinstance(exc, asyncio.TimeoutError):
            raise UpstreamTimeout(
                f"{self.url} {self.missing} within {self.seconds:g}s", url=self.url
            ) from None


def _connection_error(exc: aiohttp.ClientConnectionError, url: str) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectError(f"timed out connecting to {url}", url=url)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to {url}: {exc.strerror or exc}", url=url)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"{url} timed out: {exc}", url=url)
    return UpstreamProtocolError(f"{url} dropped the connection: {type(exc).__name__}", url=url)
