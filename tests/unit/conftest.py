"""Unit tests use no network and start no process: this makes that a rule, not a habit.

While a unit test runs, binding or connecting a socket (ZMQ's too), or starting a
subprocess, fails the test with a pointer to tests/integration/, where such tests belong.
The check is an audit hook (PEP 578), so it sees what any library does, not only what the
test does; libzmq's sockets are not Python's, so pyzmq's bind and connect are wrapped.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

# Importing urllib3 binds a socket to probe for IPv6: done once, here, before any test.
with contextlib.suppress(ImportError):
    import urllib3.util.connection  # noqa: F401

_FORBIDDEN = {
    "socket.bind",
    "socket.connect",
    "zmq.bind",
    "zmq.connect",
    "subprocess.Popen",
    "os.posix_spawn",
    "os.fork",
}
_running: list[str] = []  # the unit test running now, if any


def _refuse(event: str, args: tuple[Any, ...]) -> None:
    # Only the main thread runs tests; other threads may belong to other tiers' servers.
    if _running and event in _FORBIDDEN and threading.current_thread() is threading.main_thread():
        raise RuntimeError(
            f"{_running[0]}: {event} in a unit test; tests with sockets or processes "
            "belong in tests/integration/"
        )


sys.addaudithook(_refuse)


def _guarded(method: Any, event: str) -> Any:
    def guarded(sock: zmq.Socket[Any], *args: Any, **kwargs: Any) -> Any:
        _refuse(event, args)
        return method(sock, *args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def _no_sockets_or_processes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    for name in ("bind", "connect"):
        monkeypatch.setattr(zmq.Socket, name, _guarded(getattr(zmq.Socket, name), f"zmq.{name}"))
    _running.append(request.node.nodeid)
    try:
        yield
    finally:
        _running.clear()
