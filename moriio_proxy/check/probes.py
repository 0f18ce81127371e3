"""The HTTP calls ``check`` makes, each bounded, each turning trouble into an ``Answer``.

A deployment that is down shows itself as exceptions of many kinds; the next step differs
for a refused port, a connect that never completes (no path from here), a name that does not
resolve and a server that accepted but never answered. The calls here never raise for
network trouble: they classify it into a ``FailureKind`` the verdicts act on.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..protocol import bracket_host, split_host_port
from .answers import Answer, FailureKind

# The connect phase gets most of the budget, and its own error: a connect that never
# completes (no path from here) is told apart from a server that accepted and never answered.
_CONNECT_SHARE = 0.9


class Prober:
    """One session for all of a run's calls: to the proxy, and to each instance directly."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        timeout: float,
        instance_timeout: float,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout
        self.instance_timeout = instance_timeout
        # A proxy started with --api-key / --admin-token answers 401 without them; each
        # goes only where it belongs (the admin token to /admin/*, the key elsewhere).
        self._client = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else None

    def _headers(self, path: str) -> dict[str, str] | None:
        return self._admin if path.startswith("/admin") else self._client

    async def get(self, path: str) -> Answer:
        """GET a path of the proxy."""
        url = self.url + path
        return await call(self.session, "GET", url, self.timeout, headers=self._headers(path))

    async def post(self, path: str, payload: dict[str, Any]) -> Answer:
        """POST JSON to a path of the proxy."""
        return await call(
            self.session, "POST", self.url + path, self.timeout, payload, self._headers(path)
        )

    async def get_instance(self, base: str, path: str) -> Answer:
        """GET a path of an instance directly, with the shorter instance bound."""
        return await call(self.session, "GET", base + path, self.instance_timeout)


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    timeout: float,
    payload: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One bounded request; never raises for network trouble, it reports it."""
    started = time.monotonic()
    try:
        async with session.request(
            method,
            url,
            json=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout * _CONNECT_SHARE),
        ) as resp:
            text = await resp.text(errors="replace")
            try:
                body: Any = json.loads(text) if text else None
            except ValueError:
                body = text
            return Answer(
                url,
                time.monotonic() - started,
                status=resp.status,
                body=body,
                headers={k.lower(): v for k, v in resp.headers.items()},
            )
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        kind, error = classify(exc, timeout)
        return Answer(url, time.monotonic() - started, failure=kind, error=error)


def classify(exc: BaseException, timeout: float) -> tuple[FailureKind, str]:
    """Map aiohttp's exceptions onto the few cases that need different next steps."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout", (
            f"connect timed out after {timeout * _CONNECT_SHARE:g}s (no route, or a firewall "
            "drops the packets)"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", f"no answer within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, socket.gaierror):
            return "dns", f"cannot resolve host {exc.host!r}"
        code = getattr(os_error, "errno", None)
        if code == errno.ECONNREFUSED:
            return "refused", "connection refused"
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return (
                "unreachable",
                f"no route to {exc.host} ({getattr(os_error, 'strerror', os_error)})",
            )
        return "unreachable", f"cannot connect: {getattr(os_error, 'strerror', None) or os_error}"
    return "protocol", f"{type(exc).__name__}: {exc}"


def normalize_url(text: str) -> str:
    """``http://host:port`` from what a person types (``host:port``, a trailing ``/v1``).

    Raises ValueError for anything that cannot be a proxy URL, which the CLI turns into
    exit status 2 (bad usage) rather than a FAIL about the deployment.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("URL is empty")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL must be http:// or https://, got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"URL has a bad port: {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"URL has no host: {text!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    netloc = bracket_host(parts.hostname) + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}{path}"


def instance_url(http_address: str, scheme: str = "http") -> str | None:
    """The base URL of an instance's server, reached the way the proxy reaches it; None
    when its address is not HOST:PORT."""
    try:
        host, port = split_host_port(http_address)
    except ValueError:
        return None
    return f"{scheme}://{bracket_host(host)}:{port}"
