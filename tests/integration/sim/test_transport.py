"""The simulator's ZMQ transport: many KV reads share one socket per peer and each gets its
own answer; a read to a port nobody serves ends in None after transfer_timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from moriio_proxy.sim.settings import SimConfig
from moriio_proxy.sim.transport import Transport


def _echo(rank: int, message: dict[str, Any]) -> dict[str, Any]:
    return {"rank": rank, "n": message["n"]}


async def test_concurrent_calls_on_one_socket_get_their_own_answers() -> None:
    server = Transport(SimConfig(role="P", dp_size=2), "server")
    client = Transport(SimConfig(role="D"), "client")
    server.bind()
    client.bind()
    server.serve(_echo)
    try:
        host = "127.0.0.1"
        port = server.notify_base + 1  # rank 1's notify port
        replies = await asyncio.gather(
            *(client.call(host, port, {"type": "sim_read", "n": n}) for n in range(50))
        )
        assert replies == [{"rank": 1, "n": n} for n in range(50)]
        assert len(client._callers) == 1  # one socket to the peer, however many reads
    finally:
        await server.stop_serving()
        await client.stop_serving()
        server.close()
        client.close()


async def test_a_call_nobody_answers_returns_none_after_the_transfer_timeout() -> None:
    client = Transport(SimConfig(role="D", transfer_timeout=0.2), "client")
    client.bind()
    try:
        # The client's own handshake port: bound, but nobody reads notify messages there.
        started = time.monotonic()
        reply = await client.call("127.0.0.1", client.handshake_base, {"n": 1})
        assert reply is None
        assert time.monotonic() - started >= 0.2
    finally:
        await client.stop_serving()
        client.close()
