"""Talking to vLLM instances: one pooled aiohttp session, bounded waits, typed failures.

Every way an upstream call can go wrong becomes one UpstreamError subclass, so the
orchestration above decides status codes and retries from types, not from exception text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from .protocol import Leg

# A vLLM SSE line with logprobs can be large; aiohttp caps a line at twice this.
_READ_BUFSIZE = 1 << 20


class UpstreamError(Exception):
    """An upstream call that failed. ``kind`` is a metric label and picks the HTTP status."""

    kind = "error"
    status = 502

    def __init__(self, message: str, *, url: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        # True only when nothing reached the instance, so another pair may be tried.
        self.retryable = retryable or isinstance(self, UpstreamConnectError)


class UpstreamConnectError(UpstreamError):
    """The instance could not be reached: nothing was sent, so a retry elsewhere is safe."""

    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamProtocolError(UpstreamError):
    """The instance answered with something that is not what vLLM sends, or hung up."""

    kind = "protocol"


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

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection cap: a cap shared by both legs of every request can deadlock
        # (all slots held by decodes waiting for prefills that cannot get a slot).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
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

    async def get_json(self, url: str, timeout: float) -> Any:
        """A small GET (model lists); the whole call bounded by ``timeout``."""
        client_timeout = aiohttp.ClientTimeout(total=timeout, connect=self.timeouts.connect)
        try:
            async with self.session.get(url, timeout=client_timeout) as resp:
                return await _json_or_raise(resp, url)
        except aiohttp.ClientConnectionError as exc:
            raise _connection_error(exc, url) from None
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"{url} did not answer within {timeout:g}s", url=url) from None

    async def post_json(self, leg: Leg, timeout: float) -> dict[str, Any]:
        """POST a non-streaming leg and return its JSON body; the whole call is bounded."""
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=self.timeouts.connect, sock_connect=self.timeouts.connect
        )
        try:
            async with self.session.post(
                leg.url, json=leg.body, headers=leg.headers, timeout=client_timeout
            ) as resp:
                payload = await _json_or_raise(resp, leg.url)
        except aiohttp.ClientConnectionError as exc:
            raise _connection_error(exc, leg.url) from None
        except asyncio.TimeoutError:
            raise UpstreamTimeout(
                f"{leg.url} did not answer within {timeout:g}s", url=leg.url
            ) from None
        if not isinstance(payload, dict):
            raise UpstreamProtocolError(f"{leg.url} answered a non-object", url=leg.url)
        return payload

    async def open_stream(self, leg: Leg) -> aiohttp.ClientResponse:
        """Send a streaming leg and return the response once its status is known to be 200.

        The caller owns the response and must ``release()`` it; closing it early is how a
        vLLM request is aborted.
        """
        client_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeouts.connect,
            sock_connect=self.timeouts.connect,
            sock_read=None,
        )
        try:
            resp = await asyncio.wait_for(
                self.session.post(
                    leg.url, json=leg.body, headers=leg.headers, timeout=client_timeout
                ),
                self.timeouts.first_byte,
            )
        except aiohttp.ClientConnectionError as exc:
            raise _connection_error(exc, leg.url) from None
        except asyncio.TimeoutError:
            raise UpstreamTimeout(
                f"{leg.url} sent no response within {self.timeouts.first_byte:g}s", url=leg.url
            ) from None
        if resp.status != 200:
            try:
                await _json_or_raise(resp, leg.url)
            finally:
                resp.release()
        return resp

    async def chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The response body as it arrives: the first chunk within the first-byte limit,
        then each within the idle limit. Chunks may split lines; callers reassemble."""
        limit = self.timeouts.first_byte
        url = str(resp.url)
        while True:
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), limit)
            except asyncio.TimeoutError:
                raise UpstreamTimeout(
                    f"{url} sent nothing for {limit:g}s mid-stream", url=url
                ) from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise UpstreamProtocolError(
                    f"{url} broke the stream: {type(exc).__name__}", url=url
                ) from None
            if not chunk:
                return
            limit = self.timeouts.idle
            yield chunk


async def _json_or_raise(resp: aiohttp.ClientResponse, url: str) -> Any:
    try:
        raw = await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamProtocolError(
            f"{url} broke the response: {type(exc).__name__}", url=url
        ) from None
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    if resp.status >= 400:
        message = _error_message(payload) or f"{url} answered HTTP {resp.status}"
        raise UpstreamStatusError(message, url=url, status=resp.status, payload=payload)
    if payload is None:
        raise UpstreamProtocolError(f"{url} answered HTTP {resp.status} without JSON", url=url)
    return payload


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(payload.get("message"), str):
            return payload["message"]
    return None


def _connection_error(exc: aiohttp.ClientConnectionError, url: str) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"timed out connecting to {url}", url=url, retryable=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to {url}: {exc.strerror or exc}", url=url)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"{url} timed out: {exc}", url=url)
    return UpstreamProtocolError(f"{url} dropped the connection: {type(exc).__name__}", url=url)
