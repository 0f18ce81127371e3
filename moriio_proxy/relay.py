"""Decode's answer on its way to the client: SSE event framing, id scrubbing, stream errors.

vLLM names every response ``cmpl-``/``chatcmpl-`` + the request id the proxy sent, and that
id is the request-id sandwich, which holds internal addresses and ports (docs/protocol.md
§2). Everything that leaves for a client passes through a ``Scrubber``; streams pass
through a ``Relay`` that only ever hands out whole SSE events, so an id can never be split
across two client writes and escape half-scrubbed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from .protocol import Endpoint, error_body, public_id, rewrite_id
from .upstream import UpstreamError, UpstreamProtocolError, UpstreamStatusError, parse_object

log = logging.getLogger("moriio_proxy.relay")

DONE = b"data: [DONE]\n\n"
# Larger than any event vLLM sends (logprobs included); a peer sending more is broken.
_MAX_EVENT_BYTES = 8 << 20


class Scrubber:
    """Swaps vLLM's internal request id for the client's public one."""

    def __init__(self, internal_id: str, suffix: str, endpoint: Endpoint) -> None:
        self.internal = internal_id
        self.suffix = suffix
        self.public_id = public_id(endpoint, suffix)
        self._internal_bytes = internal_id.encode()
        self._suffix_bytes = suffix.encode()

    def data(self, raw: bytes) -> bytes:
        return raw.replace(self._internal_bytes, self._suffix_bytes)

    def json(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A parsed answer made client-safe (the prefill's, when it is the whole answer)."""
        rewritten = rewrite_id(payload, self.public_id)
        dumped = orjson.dumps(rewritten)
        if self._internal_bytes in dumped:  # e.g. echoed in an error message or a nested id
            return parse_object(self.data(dumped), "the prefill answer")
        return rewritten

    def answer(self, raw: bytes, url: str) -> bytes:
        """A decode instance's whole JSON answer made client-safe, parsed once: the
        internal id replaced wherever it appears, ``id`` set, internal KV params dropped."""
        payload = rewrite_id(parse_object(self.data(raw), url), self.public_id)
        return orjson.dumps(payload)


class Body(Protocol):
    """Where a relay reads the decode's answer (``upstream.Stream``)."""

    async def read(self) -> bytes:
        """The next piece of the body, b"" at its end; UpstreamError when it fails."""
        ...


class Relay:
    """The decode stream as client-ready SSE events, with the internal id scrubbed.

    It is its own async iterator with a synchronous ``close()``, so upstream resources
    are freed whether the client reads to the end, disconnects mid-stream, or goes away
    before the first byte (the server then never starts iterating: whoever holds the
    relay must close it).
    """

    def __init__(
        self,
        body: Body | None,
        scrub: Scrubber,
        stack: contextlib.ExitStack | None = None,
        events: list[bytes] | None = None,
    ) -> None:
        self._body = body
        self._buffer = b""
        self._scrub = scrub
        self._stack = stack or contextlib.ExitStack()
        self._pending: list[bytes] = list(events or [])
        self._done = body is None
        self._closed = False
        self.saw_done = False
        self.on_first_byte: Callable[[], None] | None = None

    @classmethod
    def from_events(cls, events: list[bytes], scrub: Scrubber) -> Relay:
        return cls(None, scrub, events=events)

    async def prime(self) -> None:
        """Read the first event before the response is committed, so an early failure can
        still become an HTTP status (and a retry) instead of an SSE error."""
        event = await self._read_event()
        if event is not None:
            self._pending.append(event)

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            return self._first(self._pending.pop(0))
        if self._done or self._closed:
            self.close()
            raise StopAsyncIteration
        try:
            event = await self._read_event()
        except UpstreamError as exc:
            log.warning("decode stream failed after the first byte: %s", exc.message)
            self._done = True
            error = error_body(f"decode stream failed: {public_message(exc)}", exc.status)
            self._pending.append(DONE)
            return sse_event(error)
        except BaseException:
            self.close()
            raise
        if event is None:
            self._done = True
            if not self.saw_done:
                error = error_body("the decode instance ended the stream early", 502)
                self._pending.append(DONE)
                return sse_event(error)
            self.close()
            raise StopAsyncIteration
        return self._first(event)

    def _first(self, event: bytes) -> bytes:
        if self.on_first_byte is not None:
            self.on_first_byte()
            self.on_first_byte = None
        return event

    async def _read_event(self) -> bytes | None:
        """Every complete SSE event received so far, as one block (one client write);
        None at the end of the stream.

        Only complete events are scrubbed and passed on, so the internal id can never be
        split across two writes; under load several events leave in one write.
        """
        assert self._body is not None
        read = self._body.read
        while chunk := await read():
            buffer = self._buffer + chunk if self._buffer else chunk
            cut = event_end(buffer)
            if cut == len(buffer):  # the usual case: the piece ends on an event boundary
                self._buffer = b""
                return self._scan(buffer)
            if cut:
                block, self._buffer = buffer[:cut], buffer[cut:]
                return self._scan(block)
            self._buffer = buffer
            if len(buffer) > _MAX_EVENT_BYTES:
                raise UpstreamProtocolError("the decode instance sent an oversized SSE event")
        if self._buffer.strip():
            block, self._buffer = self._buffer + b"\n\n", b""
            return self._scan(block)
        return None

    def _scan(self, block: bytes) -> bytes:
        if block.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in block:
            self.saw_done = True
        return self._scrub.data(block)

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        self._stack.callback(callback)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Abort the upstream response and release the in-flight counters (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stack.close()


def event_end(buffer: bytes) -> int:
    """Where the last complete SSE event in ``buffer`` ends (0: none is complete yet)."""
    lf, crlf = buffer.rfind(b"\n\n"), buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def public_message(error: UpstreamError) -> str:
    """The part of an upstream failure a client may see: no internal addresses."""
    if isinstance(error, UpstreamStatusError):
        return f"HTTP {error.status}"
    return {"timeout": "timed out", "connect": "unreachable"}.get(error.kind, "connection lost")
