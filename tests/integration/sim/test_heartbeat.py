"""The discovery heartbeat as a proxy's ROUTER receives it."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from tests.harness.legs import sim
from tests.harness.waiting import STATE_TIMEOUT, eventually


async def test_heartbeat_reaches_router() -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
    try:
        async with sim(
            "D", mode="WRITE", dp_size=2, proxy=f"127.0.0.1:{port}", heartbeat_interval=0.1
        ) as d:
            frames = await asyncio.wait_for(router.recv_multipart(), STATE_TIMEOUT)
            assert len(frames) == 2
            msg = msgpack.unpackb(frames[1], raw=False)
            assert msg == {
                "type": "D",
                "http_address": d.http_address,
                "zmq_address": d.zmq_address,
                "dp_size": 2,
                "tp_size": 1,
                "transfer_mode": "WRITE",
            }
            assert list(msg) == [
                "type",
                "http_address",
                "zmq_address",
                "dp_size",
                "tp_size",
                "transfer_mode",
            ]
            assert (
                d.zmq_address
                == f"host:127.0.0.1,handshake:{d.handshake_base},notify:{d.notify_base}"
            )

            async def quiet_for_five_intervals() -> bool:
                while await router.poll(0):  # beats sent before the switch still arrive
                    await router.recv_multipart()
                return await router.poll(500) == 0

            d.heartbeating = False
            await eventually(quiet_for_five_intervals, what="no more heartbeats")
            d.heartbeating = True
            assert await router.poll(STATE_TIMEOUT * 1000) != 0
    finally:
        router.close(linger=0)
        ctx.term()
