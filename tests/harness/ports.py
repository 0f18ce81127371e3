"""Ports for tests, without the race of "find a free port, release it, hope it stays free".

Servers started by the tests bind port 0 themselves and report the port they got
(``running_proxy``, ``serve_process``, ``SimInstance``, aiohttp sites). What is left here:

- ``refused_port``: an address where connections are refused. A socket is bound there
  and never listens, so the kernel refuses every connection and no other process can
  bind the port while the test holds it.
- ``unconnectable_port``: an address where a connect hangs, as behind a dropped SYN.
- ``free_port``: for the few servers that must be told their port before they start and
  cannot report it (``moriio-proxy demo``, real vLLM engines). Racy by nature: the caller
  must retry the start when the port was taken in between (see ``demo`` in
  tests/integration/test_cli.py).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

# Below Linux's ephemeral range (32768+): a port there is never handed out to an
# outgoing connection, so only another fixed-port picker can collide with it.
_FIXED_PORTS = (20000, 32000)


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` that refuses connections for as long as the block runs."""
    with socket.socket() as sock:
        sock.bind((host, 0))  # bound, never listening: connections get a RST
        yield sock.getsockname()[1]


@contextlib.contextmanager
def unconnectable_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port whose accept queue is full: a connect there hangs like a dropped SYN.

    That is what a host behind a network boundary looks like from here (a connect that
    never completes), without depending on how this machine routes a foreign address.
    """
    with contextlib.ExitStack() as held:
        server = held.enter_context(socket.socket())
        server.bind((host, 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(4):
            filler = held.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, port))
        yield port


def free_port(low: int = _FIXED_PORTS[0]) -> int:
    """The first loopback port from ``low`` up (below the ephemeral range) that is free now.

    The port is released before it is returned, so a server started on it may find it
    taken: start from a random ``low`` (concurrent sessions then rarely meet) and retry
    the start with another port when it fails on a taken one.
    """
    for port in range(low, _FIXED_PORTS[1]):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{_FIXED_PORTS[1]}")
