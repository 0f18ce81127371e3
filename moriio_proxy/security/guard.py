"""One door in front of the Quart routes: the request-head limit, client keys for ``/v1/*``
(and, if asked, ``/ready`` and ``/metrics``), the admin token for ``/admin/*`` and the
profile fan-out.

It is ASGI middleware keyed on the path and the method, not a check inside each route, so
a route added later under ``/admin/`` is guarded without anyone remembering to. The two
generation routes never reach it: completions.py checks their key on its fast path.

Admin rules (README: Security):

- with ``--admin-token``: every admin path needs ``Authorization: Bearer TOKEN``; none is
  401, a wrong one 403;
- without it: a read-only ``GET``/``HEAD`` under ``/admin/`` is served as before; anything
  that changes state is 403, unless ``--admin-allow-localhost`` is set and the client is
  on a loopback address.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ..protocol import error_body
from .keys import KeyRing, bearer, canonical
from .limits import head_size, head_too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROFILE_PATHS = frozenset({"/start_profile", "/stop_profile"})
_READ_ONLY = frozenset({"GET", "HEAD"})
CHALLENGE = (b"www-authenticate", b"Bearer")  # what a 401 carries (RFC 6750)
_NO_TOKEN = (
    "admin actions that change state are refused: start the proxy with --admin-token "
    "(or MORIIO_PROXY_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN', or allow "
    "loopback clients with --admin-allow-localhost"
)


async def send_refusal(send: Send, status: int, message: str) -> None:
    """An error in vLLM's shape, with the Bearer challenge on a 401."""
    body = orjson.dumps(error_body(message, status))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append(CHALLENGE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/") or path in PROFILE_PATHS


def _authorization(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value)
    return None


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class AccessGuard:
    """ASGI middleware in front of ``app`` (the Quart app)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        *,
        admin_token: str = "",
        allow_localhost: bool = False,
        keyed_paths: frozenset[str] = frozenset(),
        max_head: int = 64 * 1024,
    ) -> None:
        self.app = app
        self.max_head = max_head
        self.keys = keys
        self._admin = bearer(admin_token) if admin_token else None
        self._allow_localhost = allow_localhost
        self._keyed = keyed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await send_refusal(send, *refusal)

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) when the request may not pass, else None."""
        path: str = scope["path"]
        if head_size(scope) > self.max_head:
            return 431, head_too_large(self.max_head)
        if is_admin_path(path):
            return self._admin_refusal(scope)
        if self.keys.enabled and (path.startswith("/v1/") or path in self._keyed):
            authorization = _authorization(scope)
            if self.keys.match(authorization) is None:
                return 401, key_problem(authorization)
        return None

    def _admin_refusal(self, scope: Scope) -> tuple[int, str] | None:
        if self._admin is None:
            if scope["method"] in _READ_ONLY and scope["path"] not in PROFILE_PATHS:
                return None
            if self._allow_localhost and _loopback(scope):
                return None
            return 403, _NO_TOKEN
        authorization = _authorization(scope)
        if authorization is None:
            return 401, "this admin path needs 'Authorization: Bearer TOKEN' (--admin-token)"
        if not hmac.compare_digest(canonical(authorization), self._admin):
            return 403, "the admin token is not valid"
        return None


def key_problem(authorization: bytes | None) -> str:
    """What is wrong with a client's credentials (never echoing them)."""
    if authorization is None:
        return "missing API key: send 'Authorization: Bearer KEY'"
    return "invalid API key"
