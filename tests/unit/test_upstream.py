"""upstream.Stream: how long a relayed body may stay silent, measured without sockets.

The body is aiohttp's own StreamReader fed by hand, so what is tested is the timer logic
the relay depends on: first-byte limit, then idle limit, the request deadline, and that
time spent not waiting (a slow client) is not upstream silence.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from moriio_proxy.upstream import Stream, Timeouts, UpstreamProtocolError, UpstreamTimeout


class FakeResponse:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = BaseProtocol(loop)
        protocol.connection_made(asyncio.Transport())  # "connected", with no socket behind
        self.content = aiohttp.StreamReader(protocol, 2**16, loop=loop)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def stream(first: float, idle: float, deadline: float | None = None) -> tuple[Stream, FakeResponse]:
    resp = FakeResponse()
    timeouts = Timeouts(connect=1.0, prefill=1.0, first_byte=first, idle=idle)
    body = Stream(resp, "http://d/v1/completions", timeouts, deadline)  # type: ignore[arg-type]
    return body, resp


async def test_pieces_then_end() -> None:
    body, resp = stream(first=5, idle=5)
    resp.content.feed_data(b"data: 1\n\n")
    assert await body.read() == b"data: 1\n\n"
    resp.content.feed_eof()
    assert await body.read() == b""
    body.close()
    assert resp.closed


async def test_idle_limit_applies_after_the_first_piece() -> None:
    body, resp = stream(first=30, idle=0.2)
    resp.content.feed_data(b"data: 1\n\n")
    await body.read()  # armed for the 30 s first-byte limit until now
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"nothing for 0\.2s"):
        await body.read()
    assert time.monotonic() - started < 10  # the idle limit, not the first-byte one
    body.close()


async def test_first_byte_limit() -> None:
    body, _ = stream(first=0.2, idle=30)
    with pytest.raises(UpstreamTimeout, match=r"nothing for 0\.2s"):
        await body.read()
    body.close()


async def test_time_not_waiting_is_not_silence() -> None:
    body, resp = stream(first=0.3, idle=0.3)
    resp.content.feed_data(b"a")
    await body.read()
    # Twice the limits pass while nobody reads (the relay is busy writing to a slow
    # client): a sleep, since what is asserted is that no timeout fires meanwhile.
    await asyncio.sleep(0.6)
    resp.content.feed_data(b"b")
    assert await body.read() == b"b"  # already there: no timeout although 0.6 s passed
    body.close()


async def test_the_deadline_cuts_a_steady_stream() -> None:
    body, resp = stream(first=30, idle=30, deadline=time.monotonic() + 0.3)

    async def trickle() -> None:
        while True:
            resp.content.feed_data(b"x")
            await asyncio.sleep(0.02)

    feeder = asyncio.ensure_future(trickle())
    try:
        with pytest.raises(UpstreamTimeout, match="deadline"):
            while True:
                await body.read()
    finally:
        feeder.cancel()
        body.close()


async def test_a_broken_body_is_a_protocol_error() -> None:
    body, resp = stream(first=5, idle=5)
    resp.content.set_exception(aiohttp.ClientPayloadError("cut"))
    with pytest.raises(UpstreamProtocolError, match="broke the stream"):
        await body.read()
    body.close()
