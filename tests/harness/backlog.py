"""A listening socket's accept queue, measured from outside while its server does not accept.

A server whose event loop is busy accepts nothing; the kernel still completes handshakes
into the socket's accept queue, up to the listen() backlog (plus one), and drops the SYNs
past it. Opening many connections at once while the loop is held shows which backlog the
socket really has, whatever the server library did with the one it was given.
"""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path


def somaxconn() -> int:
    """The kernel's cap on any listen() backlog (0 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


def handshakes_completed(port: int, count: int, timeout: float) -> int:
    """Open ``count`` connections at once; how many the kernel completed by ``timeout``."""
    selector = selectors.DefaultSelector()
    pending: set[socket.socket] = set()
    done: list[socket.socket] = []
    try:
        for _ in range(count):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            selector.register(client, selectors.EVENT_WRITE)
            pending.add(client)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                selector.unregister(ready)
                pending.discard(ready)
                if ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.append(ready)
                else:
                    ready.close()
        return len(done)
    finally:
        for client in [*pending, *done]:
            client.close()
        selector.close()
