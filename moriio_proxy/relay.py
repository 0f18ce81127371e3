"""Decode's answer on its way to the client: SSE event framing, id scrubbing, stream errors.

vLLM names every response ``cmpl-``/``chatcmpl-`` + the request id the proxy sent, and that
id is the request-id sandwich, which holds internal addresses and ports (docs/protocol.md
§3.3). Everything that leaves for a client passes through a ``Scrubber``; streams pass
through a ``Relay`` that only ever hands out whole SSE events, so an id can never be split
across two client writes and escape half-scrubbed. The internal ``kv_transfer_params``,
which vLLM 0.33 puts in every streamed chunk (§10 row 8), are removed on the way too.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from .protocol import Endpoint, error_body, public_id, rewrite_id
from .upstream import UpstreamError, UpstreamProtocolError, UpstreamStatusError, parse_object

log = logging.getLogger("moriio_proxy.relay")

DONE = b"data: [DONE]\n\n"
# Larger than any event vLLM sends (logprobs included); a peer sending more is broken.
_MAX_EVENT_BYTES = 8 << 20

_KV_KEY = b'"kv_transfer_params"'
# The key as vLLM 0.33 writes it in all but a producer's last chunk: null, the last field,
# in pydantic's compact JSON, or in json.dumps' spacing (before: the bytes that precede the
# key). Inside a JSON string every quote is escaped, so these bytes only match the key.
_COMPACT_NULL = b',"kv_transfer_params":null'
_KV_NULLS = ((1, _COMPACT_NULL), (2, b', "kv_transfer_params": null'))
# vLLM's stream error event: an object whose first key is "error" (both serialisers).
_ERROR_EVENT = b'data: {"error"'
_EVENT_SEPARATOR = re.compile(rb"(\r?\n\r?\n)")
_MISSING = object()


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
        self._previous = b""  # the block before the last one read (see _scan)
        self._done = body is None
        self._closed = False
        self.saw_done = False
        # Told of each error event the decode sends after the stream was committed.
        self.on_error_event: Callable[[dict[str, Any]], None] | None = None

    @classmethod
    def from_events(cls, events: list[bytes], scrub: Scrubber) -> Relay:
        return cls(None, scrub, events=events)

    async def prime(self) -> None:
        """Read until the answer shows how it starts, before the response is committed, so
        an early failure can still become an HTTP status (and a retry) instead of an SSE
        error (docs/protocol.md §7.1, §7.6).

        Held back until a later event decides: SSE comments (vLLM's optional keep-alives)
        and chat's role-only chunk, which vLLM sends with the request's first engine output
        even when that output is a failure; it carries no text, so holding it back costs
        the client no time to first token. An error event raises UpstreamStatusError with
        the event's code; a stream that ends before any answer raises
        UpstreamProtocolError. Nothing read is lost: it all goes out once iterated.
        """
        while True:
            event = await self._read_event()
            if event is None:
                raise UpstreamProtocolError(
                    "the decode instance ended the stream before answering", url=self._url
                )
            self._pending.append(event)
            opening = _opening(event)
            if opening is _UNDECIDED:
                continue
            if opening is not None:
                inner = opening["error"]
                message = inner.get("message") if isinstance(inner, dict) else None
                raise UpstreamStatusError(
                    message if isinstance(message, str) else "the decode stream failed",
                    url=self._url,
                    status=error_status(opening),
                    payload=opening,
                )
            return

    @property
    def _url(self) -> str:
        return str(getattr(self._body, "url", ""))

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            return self._pending.pop(0)
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
        if block.startswith(b"data: [DONE]") or block.rfind(b"\ndata: [DONE]") >= 0:
            self.saw_done = True
            if self.on_error_event is not None:
                self._report_errors(self._previous + block)
        self._previous = block
        return strip_kv_params(self._scrub.data(block))

    def _report_errors(self, blocks: bytes) -> None:
        """Hand ``on_error_event`` the error events among the stream's last blocks.

        vLLM ends a failed stream with its error event and ``[DONE]``, so looking only
        where ``[DONE]`` arrives (and the block before) finds them without a scan of every
        event; an error that came before the first byte never gets here (see prime).
        """
        if _ERROR_EVENT not in blocks or self.on_error_event is None:
            return
        for payload in _payloads(blocks):
            if isinstance(payload, dict) and "error" in payload:
                self.on_error_event(payload)

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


def strip_kv_params(block: bytes) -> bytes:
    """SSE events without their ``kv_transfer_params`` (internal: a decode's are null, and
    no OpenAI client expects the key).

    Every event of every stream passes here, so the usual cases stay on bytes and search
    from the end, where vLLM puts the key: no key (0.32) is one scan; each null in one of
    the known spellings (0.33) is cut out around where it was found. Only a block with a
    key that is not such a null (a real value, an unusual spacing, or the words inside
    generated text) is parsed, event by event.
    """
    found = block.rfind(_KV_KEY)  # rfind: about twice as fast as `in` on these blocks
    if found < 0:
        return block
    start = found - 1
    if block.startswith(_COMPACT_NULL, start) and block.rfind(_KV_KEY, 0, start) < 0:
        return block[:start] + block[start + len(_COMPACT_NULL) :]  # one 0.33 event
    kept: list[bytes] = []
    end = len(block)
    while found >= 0:
        for before, null in _KV_NULLS:
            start = found - before
            if start >= 0 and block.startswith(null, start):
                kept.append(block[start + len(null) : end])
                end = start
                break
        else:
            return _strip_parsed(block)
        found = block.rfind(_KV_KEY, 0, end)
    kept.append(block[:end])
    kept.reverse()
    return b"".join(kept)


def _strip_parsed(block: bytes) -> bytes:
    parts = _EVENT_SEPARATOR.split(block)  # event, separator, event, ..., tail
    return b"".join(_without_kv_params(p) if _KV_KEY in p else p for p in parts)


def _without_kv_params(event: bytes) -> bytes:
    """One event with the key removed from its JSON data; unchanged when it has no JSON
    object holding the key (the words may appear in generated text)."""
    lines = event.splitlines()
    data = [line for line in lines if line.startswith(b"data:")]
    try:
        payload = orjson.loads(b"\n".join(line[5:] for line in data))
    except orjson.JSONDecodeError:
        return event
    if not isinstance(payload, dict) or payload.pop("kv_transfer_params", _MISSING) is _MISSING:
        return event
    others = [line for line in lines if not line.startswith(b"data:")]
    return b"\n".join([*others, b"data: " + orjson.dumps(payload)])


def _payloads(block: bytes) -> list[Any]:
    """The parsed JSON data of each event in a block (None where it is not JSON)."""
    payloads: list[Any] = []
    for event in _EVENT_SEPARATOR.split(block)[::2]:
        data = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
        if not data:
            continue
        try:
            payloads.append(orjson.loads(b"\n".join(data)))
        except orjson.JSONDecodeError:
            payloads.append(None)
    return payloads


_UNDECIDED: Any = object()


def _opening(block: bytes) -> Any:
    """How a stream's first events open the answer: ``_UNDECIDED`` while they are only
    comments and bare chat role chunks, the parsed error event when that comes first,
    else None (an answer: a chunk with text, ``[DONE]``, anything unparsable)."""
    for event in _EVENT_SEPARATOR.split(block)[::2]:
        data = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
        if not data:
            continue  # a comment (keep-alive) or an empty tail
        raw = b"\n".join(data).strip()
        if raw == b"[DONE]":
            return None
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if isinstance(payload, dict) and "error" in payload:
            return payload
        if not _bare_role_chunk(payload):
            return None
    return _UNDECIDED


def _bare_role_chunk(payload: Any) -> bool:
    """Chat's opening chunk: each choice says only who speaks (role, empty content)."""
    if not isinstance(payload, dict):
        return False
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or payload.get("usage"):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or "role" not in delta or choice.get("finish_reason"):
            return False
        if any(value for key, value in delta.items() if key != "role"):
            return False
    return True


def error_status(payload: dict[str, Any]) -> int:
    """The HTTP status an error event stands for: its ``code``, 500 when it has none."""
    inner = payload.get("error")
    code = inner.get("code") if isinstance(inner, dict) else None
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 500


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
    return {
        "timeout": "timed out",
        "connect": "unreachable",
        "kv_load": "the KV cache never arrived from the prefill instance",
    }.get(error.kind, "connection lost")
