"""Serving the app with Hypercorn on a socket we bind ourselves.

Binding first lets a bad port fail before anything starts, and lets tests and the demo
ask for port 0 and learn which port they got.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from .config import ProxyConfig
from .security.tls import ServerTls

# Connections the kernel completes and queues while the event loop is busy elsewhere. A
# full queue drops new connections' handshakes: a client then waits for SYN retransmits
# (1 s, 3 s, 7 s...) or is reset. Linux caps it at net.core.somaxconn.
BACKLOG = 2048


class _Config(HypercornConfig):
    """Hypercorn's config with the per-response headers built once a second, not once
    per response (its date formatting is a measurable part of a small response), and no
    ``server`` header naming the implementation."""

    include_server_header = False

    def __init__(self) -> None:
        super().__init__()
        self._headers: tuple[int, list[tuple[bytes, bytes]]] = (-1, [])

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        now = int(time.time())
        if self._headers[0] != now:
            self._headers = (now, super().response_headers(protocol))
        return list(self._headers[1])


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; raises OSError with the address in the message.

    ``reuse_port``: join the SO_REUSEPORT group of a ``serve --workers N`` fleet, whose
    listeners share the port and get the connections the kernel spreads over them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def serve(
    app: Quart,
    sock: socket.socket,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    graceful_timeout: float = 5.0,
    tls: ServerTls | None = None,
    max_header_bytes: int = 64 * 1024,
) -> None:
    """Run Hypercorn on ``sock`` until ``shutdown_trigger`` returns; over TLS when ``tls``
    is given (client certificates required when it names a CA)."""
    config = _Config()
    # Hypercorn takes ownership of (and closes) the descriptor it is given: hand it a dup.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    # Hypercorn calls listen() again on that socket with its own backlog (100 by default),
    # which would replace ours: under a burst of new streams a worker whose loop is busy
    # for a fraction of a second then drops connections (bench/README.md, streams).
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = _error_log()
    config.graceful_timeout = graceful_timeout
    # Hypercorn holds a closed client's socket until this idle timer ends, so a long one
    # piles up CLOSE-WAIT sockets under connection churn: keep its 5 s default.
    config.keep_alive_timeout = 5
    # A request head larger than this is answered 431 by Hypercorn (h11) before the app
    # sees it; HTTP/2 (TLS with ALPN h2) gets the same bound on its header list.
    config.h11_max_incomplete_size = max_header_bytes
    config.h2_max_header_list_size = max_header_bytes
    if tls is not None:
        config.certfile = tls.certfile
        config.keyfile = tls.keyfile
        if tls.ca_certs:
            config.ca_certs = tls.ca_certs
            config.verify_mode = ssl.CERT_REQUIRED
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)


async def serve_configured(
    app: Quart,
    sock: socket.socket,
    shutdown_trigger: Callable[[], Awaitable[None]],
    config: ProxyConfig,
    tls: ServerTls | None,
) -> None:
    """``serve`` as a configured proxy (one process, or a worker) serves: in-flight requests
    get --drain-timeout, request heads --max-header-bytes, TLS if configured."""
    await serve(
        app,
        sock,
        shutdown_trigger,
        graceful_timeout=config.drain_timeout,
        tls=tls,
        max_header_bytes=config.max_header_bytes,
    )


def _error_log() -> logging.Logger:
    """Hypercorn's error log, through the proxy's own logging setup, without its startup line.

    Given "-", Hypercorn gives the logger a stderr handler of its own and the record also
    reaches ours: every line came out twice. Its "Running on ..." line says what the CLI's
    "serving OpenAI on ..." line already says, and would come once per worker process.
    """
    logger = logging.getLogger("hypercorn.error")
    logger.addFilter(_not_running_on)  # the same function twice is one filter
    return logger


def _not_running_on(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Running on ")
