"""Server-sent events as the proxy and the simulator write them (``data: ...`` lines)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

DONE = "[DONE]"


def sse_events(raw: bytes, *, strict: bool = False) -> list[Any]:
    """The ``data:`` payloads in ``raw``, parsed; ``[DONE]`` stays the string.

    ``strict``: every non-blank line must be a ``data: `` line (the simulator writes
    nothing else, as vLLM does); otherwise other lines (comments, ``event:``) are skipped.
    """
    events: list[Any] = []
    for line in raw.decode().splitlines():
        if not line.strip():
            continue
        if strict:
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        elif not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        events.append(data if data == DONE else json.loads(data))
    return events


async def read_sse(resp: aiohttp.ClientResponse, *, strict: bool = False) -> list[Any]:
    """Every event of a response's body, read to its end."""
    events: list[Any] = []
    async for raw in resp.content:
        events.extend(sse_events(raw, strict=strict))
    return events


async def read_sse_until_cut(
    resp: aiohttp.ClientResponse,
) -> tuple[list[Any], aiohttp.ClientPayloadError | None]:
    """Every event until the body ends or is cut, and the error it was cut with (or None)."""
    events: list[Any] = []
    try:
        async for raw in resp.content:
            events.extend(sse_events(raw))
    except aiohttp.ClientPayloadError as exc:
        return events, exc
    return events, None
