"""The listening socket keeps the proxy's backlog once Hypercorn serves it.

Hypercorn calls listen() again on the socket it is handed, with its own backlog (100 by
default). With that, a worker whose event loop is busy for a moment under a burst of new
streams has the kernel drop the connections past the 101st: their clients wait for SYN
retransmits or are reset (the streams benchmark saw hundreds of such resets).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import pytest
from quart import Quart

from moriio_proxy.server import BACKLOG, bind_listener, serve
from tests.harness.backlog import handshakes_completed, somaxconn

CONNECTIONS = 300  # well past Hypercorn's default of 100, well under ours


def _serving(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing-here", timeout=2)
    except urllib.error.HTTPError:
        return True  # an HTTP answer (404): Hypercorn is accepting
    except OSError:
        return False
    return True


def test_connections_queue_past_hypercorns_default_backlog_while_the_loop_is_busy():
    if somaxconn() < CONNECTIONS:
        pytest.skip(f"net.core.somaxconn is below {CONNECTIONS}: the kernel caps any backlog")
    assert BACKLOG > CONNECTIONS
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    frozen, release = threading.Event(), threading.Event()

    def freeze() -> None:
        frozen.set()
        release.wait(30)  # the loop accepts nothing while this runs

    async def run() -> None:
        await serve(Quart(__name__), sock, stop.wait, graceful_timeout=1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not _serving(port):
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.05)
        loop.call_soon_threadsafe(freeze)
        assert frozen.wait(10)
        # The kernel completes handshakes into the accept queue with no help from the
        # process: all of them fit in our backlog, only 101 in Hypercorn's default one.
        assert handshakes_completed(port, CONNECTIONS, timeout=5.0) == CONNECTIONS
    finally:
        release.set()
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)
        sock.close()
        if not thread.is_alive():
            loop.close()
