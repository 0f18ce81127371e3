"""The load generator: one streaming completion per connection, parsed as it arrives.

Why this shape: ten thousand streams at one token a second each is ten thousand SSE events
a second into one Python process that shares two cores with the proxy under test and the
simulators. An ``asyncio.Protocol`` per stream, fed raw bytes, costs a few microseconds per
event: it de-chunks incrementally, splits SSE events, and keeps only what the verdict needs
(the text pieces, counts and times), never the whole body. aiohttp would cost several times
as much per event and keep a task per stream. Each stream has its own connection, so the
proxy holds exactly one client socket and one upstream socket per stream.

The verdict of a stream is what bench/README.md lists as an error: a status other than 200,
a stream cut before its end, no ``[DONE]``, an SSE error event, or text other than
``moriio_proxy.sim.expected_text`` for its prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from ..overhead.http1 import encode_request
from ..overhead.loadgen import Prompt

GAP_BUCKET = 0.05  # seconds per bucket of the inter-event gap histogram
_GAP_BUCKETS = 1200  # up to 60 s; longer gaps land in the last bucket
_ERROR_SAMPLES = 12
_SAMPLES_PER_LABEL = 3


@dataclass(slots=True)
class StreamRecord:
    """One stream as the client saw it."""

    index: int
    prompt: Prompt
    sent: float = 0.0  # time.monotonic() when the request was written
    status: int = 0
    first_event: float = 0.0
    last_event: float = 0.0
    events: int = 0  # token events (not [DONE], not errors)
    text: list[str] = field(default_factory=list)
    saw_done: bool = False
    ended: bool = False  # the chunked body's last chunk arrived
    closed_by_us: bool = False
    error: str | None = None
    detail: str = ""

    def verdict(self) -> str | None:
        """Why this stream failed (an error label), or None when it is right."""
        if self.error is not None:
            return self.error
        if self.status != 200:
            return f"http_{self.status}" if self.status else "no_response"
        if not self.ended:
            return "truncated"
        if not self.saw_done:
            return "stream_without_done"
        if "".join(self.text) != self.prompt.expected:
            return "wrong_text"
        return None


class Tracker:
    """What every stream of one phase adds up to, updated as bytes arrive."""

    def __init__(self) -> None:
        self.records: list[StreamRecord] = []
        self.opened = 0  # connections made
        self.first_events = 0  # streams that received their first token event
        self.finished = 0  # streams over, for whatever reason
        self.events = 0  # token events received, all streams
        self.gaps = [0] * _GAP_BUCKETS  # histogram of the gaps between a stream's events
        self.max_gap = 0.0

    def add_gap(self, gap: float) -> None:
        self.gaps[min(int(gap / GAP_BUCKET), _GAP_BUCKETS - 1)] += 1
        if gap > self.max_gap:
            self.max_gap = gap

    def gap_quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding quantile ``q`` of all gaps."""
        total = sum(self.gaps)
        if not total:
            return None
        rank, seen = q * total, 0
        for i, count in enumerate(self.gaps):
            seen += count
            if seen >= rank:
                return (i + 1) * GAP_BUCKET
        return _GAP_BUCKETS * GAP_BUCKET

    def open_streams(self) -> int:
        return self.opened - self.finished

    def errors(self, *, closed_ok: bool = False) -> tuple[Counter[str], list[str]]:
        """Error labels over every record and a few samples; ``closed_ok``: a stream the
        client closed itself (the idle phase) counts as right if nothing failed before."""
        counts: Counter[str] = Counter()
        samples: list[str] = []  # the first few of each kind
        for record in self.records:
            if closed_ok and record.closed_by_us and record.error is None:
                label = None if record.status == 200 and record.events else "no_first_event"
            else:
                label = record.verdict()
            if label is not None:
                counts[label] += 1
                if counts[label] <= _SAMPLES_PER_LABEL and len(samples) < _ERROR_SAMPLES:
                    samples.append(f"stream {record.index}: {label} {record.detail[:200]}".strip())
        return counts, samples


class StreamProtocol(asyncio.Protocol):
    """One streamed completion on a connection of its own."""

    def __init__(self, record: StreamRecord, request: bytes, tracker: Tracker) -> None:
        self.record = record
        self._request = request
        self._tracker = tracker
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._chunked = False
        self._length = -1  # Content-Length of a non-streamed (error) answer
        self._raw = b""  # body bytes not yet de-chunked
        self._left = 0  # bytes left in the current chunk
        self._skip = 0  # bytes of CRLF left after the current chunk
        self._sse = b""  # de-chunked bytes not yet a whole SSE event
        self._over = False

    # ----------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._tracker.opened += 1
        self.record.sent = time.monotonic()
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return
            self._head = b""
            self._in_body = True
            lower = head[:end].lower()
            self.record.status = int(lower[9:12])
            self._chunked = b"\r\ntransfer-encoding: chunked" in lower
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                self._length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            data = head[end + 4 :]
        if self._chunked:
            self._dechunk(data)
        else:
            self._raw += data
            if 0 <= self._length <= len(self._raw):
                self._fail(f"http_{self.record.status}", self._raw[:300].decode(errors="replace"))

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        if not self._over:
            if not record.closed_by_us and record.error is None and not record.ended:
                record.error = "truncated"
                after = f"{time.monotonic() - record.sent:.1f} s after connecting"
                how = f"connection lost: {exc!r}" if exc else "connection closed"
                got = f"status {record.status}, {record.events} tokens" if record.status else ""
                record.detail = f"{how} {after} {got}".strip()
            self._end()

    # ----------------------------------------------------------------- parsing

    def _dechunk(self, data: bytes) -> None:
        buf = self._raw + data if self._raw else data
        pos, size = 0, len(buf)
        while pos < size:
            if self._left:
                take = min(self._left, size - pos)
                self._sse_feed(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._skip = 2
            elif self._skip:
                step = min(self._skip, size - pos)
                pos += step
                self._skip -= step
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                chunk = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if chunk == 0:
                    self.record.ended = True
                    self._finish()
                    return
                self._left = chunk
        self._raw = buf[pos:]

    def _sse_feed(self, piece: bytes) -> None:
        buf = self._sse + piece if self._sse else piece
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._sse = buf
            return
        self._sse = buf[cut + 2 :]
        for event in buf[:cut].split(b"\n\n"):
            self._event(event)

    def _event(self, event: bytes) -> None:
        record = self.record
        data = event[6:] if event.startswith(b"data: ") else event
        if data == b"[DONE]":
            record.saw_done = True
            return
        try:
            payload: Any = orjson.loads(data)
            text = payload["choices"][0]["text"] if "error" not in payload else None
        except (orjson.JSONDecodeError, LookupError, TypeError):
            payload, text = None, None
        if text is None:
            if record.error is None:
                record.error = "sse_error" if isinstance(payload, dict) else "bad_event"
                record.detail = event[:300].decode(errors="replace")
            return
        now = time.monotonic()
        tracker = self._tracker
        if record.events:
            tracker.add_gap(now - record.last_event)
        else:
            record.first_event = now
            tracker.first_events += 1
        record.last_event = now
        record.events += 1
        tracker.events += 1
        record.text.append(text)

    # ----------------------------------------------------------------- endings

    def _fail(self, label: str, detail: str) -> None:
        if self.record.error is None:
            self.record.error = label
            self.record.detail = detail
        self._finish()

    def _finish(self) -> None:
        """The answer is complete (or failed): hang up, count the stream as over."""
        if self._transport is not None:
            self.record.closed_by_us = True
            self._transport.close()
        self._end()

    def _end(self) -> None:
        if not self._over:
            self._over = True
            self._tracker.finished += 1

    def close(self) -> None:
        """Hang up mid-stream (the idle phase's end): not an error for this stream."""
        if not self._over and self._transport is not None:
            self.record.closed_by_us = True
            self._transport.close()


async def open_stream(
    host: str, port: int, path: str, record: StreamRecord, tracker: Tracker
) -> StreamProtocol | None:
    """Connect and send ``record``'s request; None (and the record failed) if that fails."""
    body = orjson.dumps(record.prompt.request.body)
    request = encode_request(host, port, path, body)
    tracker.records.append(record)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        _, protocol = await loop.create_connection(
            lambda: StreamProtocol(record, request, tracker), host, port
        )
    except OSError as exc:
        record.error = "connect"
        record.detail = f"{exc!r} after {time.monotonic() - started:.1f} s"
        tracker.finished += 1
        tracker.opened += 1  # counted as opened and over, so open_streams() stays right
        return None
    return protocol
