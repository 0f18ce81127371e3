"""A pooled connection the server closes as the next request goes out is sent again once.

vLLM (uvicorn) drops idle keep-alive connections after 5 s; a request that lands on one
just as it closes never reached vLLM, so resending it is safe and the client never sees
the race. A request the server really failed on must not be sent twice.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from moriio_proxy.protocol import Leg
from moriio_proxy.upstream import Timeouts, Upstream, UpstreamProtocolError

OK = json.dumps({"ok": True}).encode()


class FlakyServer:
    """HTTP/1.1 keep-alive server; ``drop_next_on_reused`` closes a reused connection as
    the next request arrives, without answering (the race, made deterministic)."""

    def __init__(self, drop_every_request: bool = False) -> None:
        self.requests = 0
        self.drop_next_on_reused = False
        self.drop_every_request = drop_every_request
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                reused = served_here > 0
                if self.drop_every_request or (reused and self.drop_next_on_reused):
                    self.drop_next_on_reused = False
                    break  # close without an answer
                served_here += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(OK)).encode() + b"\r\n\r\n" + OK
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def upstream():
    up = Upstream(Timeouts(connect=2, prefill=5, first_byte=5, idle=5))
    await up.start()
    yield up
    await up.close()


async def test_a_stale_pooled_connection_is_resent_once(upstream: Upstream):
    server = FlakyServer()
    url = await server.start()
    leg = Leg(url, {"prompt": "x"}, {})
    try:
        assert await upstream.post_json(leg, 5) == {"ok": True}
        server.drop_next_on_reused = True  # the pooled connection dies as we reuse it
        assert await upstream.post_json(leg, 5) == {"ok": True}
        assert server.requests == 3  # the dropped attempt, then the resend
    finally:
        await server.close()


async def test_a_server_that_drops_every_request_is_not_retried_forever(upstream: Upstream):
    server = FlakyServer(drop_every_request=True)
    url = await server.start()
    try:
        with pytest.raises(UpstreamProtocolError):
            await upstream.post_json(Leg(url, {"prompt": "x"}, {}), 5)
        assert server.requests == 2  # one resend at most
    finally:
        await server.close()
