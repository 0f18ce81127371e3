"""What one client request ends as: a whole JSON answer, a stream, or a ProxyError.

These are the types the request path hands back up to ``completions``, which turns them
into HTTP; they live apart from the flow that makes them so that both ``disagg`` (retries,
choosing pairs) and ``attempt`` (one pair's legs) can produce them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .protocol import error_body
from .relay import Relay


class ProxyError(Exception):
    """What the client is told when a request cannot be served: a status and a message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.err_type, self.param)


@dataclass
class JsonAnswer:
    """A whole (non-streaming) answer: JSON bytes, already scrubbed of internal ids."""

    body: bytes


@dataclass
class StreamAnswer:
    """SSE bytes for the client. Iterate it or ``close()`` it: either way upstream is freed."""

    chunks: Relay
