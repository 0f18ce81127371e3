"""What one client request did, filled in along its path and read once when it ends.

The request path writes plain attributes here (which pair, how many attempts, when each
phase ended) and nothing else; the metrics, the access log and the trace are all made
from this one record when the request finishes, so the path pays for a few attribute
stores, not for three observers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tracing import RequestTrace

NO_MODE = "none"  # the mode label of a request that never reached a pair


class RequestRecord:
    """One request's facts. Times are ``time.monotonic()`` readings or durations in
    seconds; None where the request never got that far."""

    __slots__ = (
        "attempts",
        "chunks",
        "decode",
        "decode_first_byte",
        "ended",
        "endpoint",
        "first_byte",
        "last_chunk",
        "mode",
        "outcome",
        "prefill",
        "prefill_seconds",
        "rank",
        "request_id",
        "started",
        "status",
        "stream",
        "trace",
    )

    def __init__(self, endpoint: str, request_id: str, started: float) -> None:
        self.endpoint = endpoint
        # The id the client knows the request by (its X-Request-Id, or the proxy's);
        # never the internal request-id sandwich.
        self.request_id = request_id
        self.started = started
        self.stream = False
        self.mode = NO_MODE
        self.prefill: str | None = None  # the chosen instances' addresses, last attempt
        self.rank: int | None = None
        self.decode: str | None = None
        self.attempts = 0
        self.status = 0
        self.outcome = ""
        self.prefill_seconds: float | None = None  # the last attempt's prefill leg
        self.decode_first_byte: float | None = None  # decode leg sent -> its first byte
        self.first_byte: float | None = None  # when the client's first byte left
        self.last_chunk: float | None = None
        self.chunks = 0  # SSE events sent to the client (about one token each)
        self.ended: float | None = None
        self.trace: RequestTrace | None = None  # set only when tracing is on

    def phases(self) -> dict[str, float]:
        """The phase timings that exist, in seconds (``_s``) from the request's arrival
        (ttft, total) or as durations (prefill, decode_first_byte), rounded to 0.1 ms."""
        out: dict[str, float] = {}
        if self.prefill_seconds is not None:
            out["prefill_s"] = round(self.prefill_seconds, 4)
        if self.decode_first_byte is not None:
            out["decode_first_byte_s"] = round(self.decode_first_byte, 4)
        started = self.started
        if self.first_byte is not None:
            out["ttft_s"] = round(self.first_byte - started, 4)
        if self.ended is not None:
            out["total_s"] = round(self.ended - started, 4)
        return out

    def chunk_rate(self) -> float | None:
        """SSE events per second after the first, the stream's token rate as the client
        saw it; None for an answer of fewer than two events."""
        if self.chunks < 2 or self.first_byte is None or self.last_chunk is None:
            return None
        spread = self.last_chunk - self.first_byte
        return (self.chunks - 1) / spread if spread > 0 else None
