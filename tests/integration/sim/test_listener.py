"""The simulated instance's HTTP listener keeps a deep accept queue.

A benchmark opening thousands of streams at once reaches the simulated decodes faster than
their event loops accept; with aiohttp's default backlog (128) the kernel drops the SYNs
past it and those clients stall for SYN retransmits, which then show up in the figures as
if the proxy had added them.
"""

from __future__ import annotations

import pytest

from moriio_proxy.sim.api.listener import BACKLOG
from tests.harness.backlog import handshakes_completed, somaxconn
from tests.harness.legs import sim

CONNECTIONS = 300  # well past aiohttp's default backlog of 128, well under ours


async def test_connections_queue_past_aiohttps_default_backlog_while_the_loop_is_busy() -> None:
    if somaxconn() < CONNECTIONS:
        pytest.skip(f"net.core.somaxconn is below {CONNECTIONS}: the kernel caps any backlog")
    assert BACKLOG > CONNECTIONS
    async with sim("D") as d:
        # Synchronous: the event loop, and so the instance, accepts nothing meanwhile.
        assert handshakes_completed(d.port, CONNECTIONS, timeout=5.0) == CONNECTIONS
