"""Per-client limits on the generation routes: requests in flight, requests per second,
and a ceiling on the tokens one request may ask for.

A client is its API key when keys are configured, else its address. The counts live in
the process that serves the request: with ``serve --workers N`` each worker counts its own
connections, so a client may reach up to N times a limit (``--help`` says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from ..protocol import RequestError

# Beyond this many tracked clients, the buckets of clients that are back to a full burst
# (nothing left to remember) are dropped, so a stream of new addresses cannot grow the
# table without bound.
_PRUNE_AT = 4096


class KeyLimits:
    """In-flight and rate limits per client. ``admit`` either takes a slot (and a token)
    and returns None, or returns why not and when to retry; every admitted request must be
    ``release``d once it ends, whatever its outcome."""

    def __init__(
        self,
        max_inflight: int = 0,
        rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_inflight = max_inflight
        self.rate = rate
        self.burst = max(1.0, rate)
        self.enabled = bool(max_inflight or rate)
        self._clock = clock
        self._inflight: dict[Hashable, int] = {}
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # client -> (tokens, when)

    def admit(self, client: Hashable) -> tuple[str, int] | None:
        """None when ``client`` may start a request now, else (message, Retry-After s)."""
        inflight = self._inflight.get(client, 0)
        if self.max_inflight and inflight >= self.max_inflight:
            return (
                f"this client already has {inflight} requests in flight, its limit; "
                "retry when one has finished",
                1,
            )
        if self.rate:
            now = self._clock()
            tokens, then = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                return (f"this client is over its limit of {self.rate:g} requests/s", wait)
            if len(self._buckets) >= _PRUNE_AT and client not in self._buckets:
                self._prune(now)
            self._buckets[client] = (tokens - 1.0, now)
        self._inflight[client] = inflight + 1
        return None

    def release(self, client: Hashable) -> None:
        left = self._inflight.get(client, 0) - 1
        if left > 0:
            self._inflight[client] = left
        else:
            self._inflight.pop(client, None)

    def inflight(self, client: Hashable) -> int:
        return self._inflight.get(client, 0)

    def _prune(self, now: float) -> None:
        full = [
            c
            for c, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self.rate >= self.burst
        ]
        for client in full:
            del self._buckets[client]


def apply_max_tokens_limit(body: dict[str, Any], limit: int) -> None:
    """Hold a request to ``limit`` generated tokens: asking for more is a 400, and a request
    that names no figure is given the limit (else vLLM would allow up to the model's
    context, which is the point of a ceiling)."""
    named = False
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        named = True
        if value > limit:
            raise RequestError(
                f"'{key}' is {value}; this proxy allows at most {limit} generated tokens", key
            )
    if not named:
        body["max_tokens"] = limit


def head_size(scope: Mapping[str, Any]) -> int:
    """The bytes of a request head as the client sent it: path, query and headers.

    Hypercorn's own bound (h11's max_incomplete_size) only measures a head still
    incomplete after a read of up to 64 KiB, so a head that arrives in one or two reads
    passes it at up to about twice the figure; the proxy measures the head itself (the
    generation routes in the header scan they already make, completions.py; every other
    path in the guard).
    """
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    for name, value in scope["headers"]:
        size += len(name) + len(value)
    return size


def head_too_large(limit: int) -> str:
    return f"the request head exceeds the limit of {limit} bytes"
