"""The two OpenAI generation routes as a plain ASGI handler in front of the Quart app.

Every token of every answer passes through these two routes, and a profile of the proxy
under load put about a third of its CPU in Quart's per-request machinery (request and
response objects, context push, routing) that they do not need. So they are served here
on the bare ASGI interface Hypercorn speaks, and every other path (health, readiness,
metrics, admin, model list) falls through to Quart unchanged.

What Quart did for these routes is done here on purpose: the body size limit (413) and
read timeout, errors in vLLM's shape and never a stack trace, and cancelling the work
when the client disconnects (Hypercorn reports it as an ``http.disconnect`` message but
does not cancel the application).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from .answer import JsonAnswer, ProxyError, StreamAnswer
from .compat import timeout_after
from .disagg import client_id
from .protocol import Endpoint, RequestError, error_body, parse_client_request
from .record import RequestRecord
from .security import CHALLENGE, apply_max_tokens_limit, head_too_large, key_problem
from .state import ProxyState

log = logging.getLogger("moriio_proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
BODY_TIMEOUT = 60.0  # seconds for a client to finish sending its request body

_JSON = (b"content-type", b"application/json")
_SSE = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_END = {"type": "http.response.body", "body": b"", "more_body": False}
# The status a request the client abandoned is logged with (nginx's "client closed").
CLIENT_CLOSED = 499


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CompletionsEndpoint:
    """ASGI middleware: serves ``POST /v1/completions`` and ``POST /v1/chat/completions``
    itself and hands every other request (and the lifespan) to ``fallback``."""

    def __init__(self, proxy: ProxyState, fallback: ASGIApp) -> None:
        self.proxy = proxy
        self.fallback = fallback
        self._session_header = proxy.config.session_header.lower().encode("latin-1")
        self._keys = proxy.keys if proxy.keys.enabled else None
        self._limits = proxy.limits if proxy.limits.enabled else None
        self._max_tokens = proxy.config.max_tokens_limit
        self._max_head = proxy.config.max_header_bytes
        self._passthrough = proxy.config.upstream_auth == "passthrough"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.fallback(scope, receive, send)
        elif scope["method"] != "POST":
            body = error_body(f"method {scope['method']} is not allowed; use POST", 405)
            await _send_json(send, 405, orjson.dumps(body), [(b"allow", b"POST")])
        else:
            await self._serve(endpoint, scope, receive, send)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        proxy, metrics = self.proxy, self.proxy.metrics
        request_id, length, session, traceparent, authorization, head = _headers(
            scope, self._session_header
        )
        suffix = client_id(request_id)
        record = RequestRecord(endpoint, suffix, started)
        headers = [(b"x-request-id", suffix.encode())]
        if head > self._max_head:
            metrics.count_request(endpoint, "bad_request")
            self._log(record, 431, "bad_request")
            return await _send_error(send, 431, head_too_large(self._max_head), headers)
        client: Any = None  # who the per-client limits count: the key, else the address
        if self._keys is not None:
            client = self._keys.match(authorization)
            if client is None:
                metrics.rejected.labels("unauthorized").inc()
                self._log(record, 401, "unauthorized")
                return await _send_error(
                    send, 401, key_problem(authorization), [*headers, CHALLENGE]
                )
        if proxy.draining:
            metrics.rejected.labels("draining").inc()
            self._log(record, 503, "draining")
            return await _send_error(send, 503, "the proxy is shutting down", headers)
        limit = proxy.config.max_inflight
        if limit and proxy.inflight >= limit:
            metrics.rejected.labels("over_capacity").inc()
            self._log(record, 429, "over_capacity")
            message = f"the proxy is at its limit of {limit} requests in flight; retry shortly"
            return await _send_error(send, 429, message, [*headers, (b"retry-after", b"1")])
        try:
            raw = await _read_body(receive, length, proxy.config.max_body_bytes)
            if raw is None:
                return  # the client left before its body arrived: nobody to answer
            parsed = parse_client_request(
                endpoint,
                orjson.loads(raw),
                authorization=_text(authorization) if self._passthrough else None,
            )
            if self._max_tokens:
                apply_max_tokens_limit(parsed.body, self._max_tokens)
        except _BodyError as exc:
            metrics.count_request(endpoint, "bad_request")
            self._log(record, exc.status, "bad_request")
            return await _send_error(send, exc.status, exc.message, headers)
        except RequestError as exc:
            metrics.count_request(endpoint, "bad_request")
            self._log(record, 400, "bad_request")
            body = orjson.dumps(error_body(exc.message, 400, param=exc.param))
            return await _send_json(send, 400, body, headers)
        except orjson.JSONDecodeError as exc:
            metrics.count_request(endpoint, "bad_request")
            self._log(record, 400, "bad_request")
            return await _send_error(send, 400, f"request body is not valid JSON: {exc}", headers)

        limits = self._limits
        if limits is not None:
            if client is None:
                client = (scope.get("client") or ("",))[0]
            refused = limits.admit(client)
            if refused is not None:
                metrics.rejected.labels("client_limit").inc()
                self._log(record, 429, "client_limit")
                message, retry = refused
                extra = [*headers, (b"retry-after", str(retry).encode())]
                return await _send_error(send, 429, message, extra)
        record.stream = parsed.stream
        if proxy.tracing is not None:
            record.trace = proxy.tracing.request(endpoint, suffix, traceparent)
        watcher = _DisconnectWatcher(receive)
        try:
            await self._answer(parsed, session, headers, record, send, client)
        finally:
            watcher.stop()

    def _log(self, record: RequestRecord, status: int, outcome: str) -> None:
        """The access-log line of a request refused before it reached an instance."""
        if self.proxy.access_log is not None:
            record.status, record.outcome, record.ended = status, outcome, time.monotonic()
            self.proxy.access_log.write(record)

    async def _answer(
        self,
        parsed: Any,
        session: str | None,
        headers: list[tuple[bytes, bytes]],
        record: RequestRecord,
        send: Send,
        client: Any,
    ) -> None:
        proxy, metrics, limits = self.proxy, self.proxy.metrics, self._limits
        proxy.inflight += 1
        metrics.inflight.inc()
        finished = False

        def finish(status: int, outcome: str) -> None:
            nonlocal finished
            if not finished:
                finished = True
                if limits is not None:
                    limits.release(client)
                proxy.inflight -= 1
                metrics.inflight.dec()
                metrics.count_request(record.endpoint, outcome)
                record.status, record.outcome, record.ended = status, outcome, time.monotonic()
                metrics.observe(record)
                if proxy.access_log is not None:
                    proxy.access_log.write(record)
                if record.trace is not None:
                    record.trace.finish(record)

        try:
            answer = await proxy.disagg.handle(parsed, record.request_id, session, record)
        except ProxyError as exc:
            status = exc.status
            finish(status, "no_instances" if status == 503 else f"error_{status}")
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            return await _send_json(send, status, orjson.dumps(exc.body()), headers + extra)
        except asyncio.CancelledError:
            finish(CLIENT_CLOSED, "cancelled")
            raise
        except Exception:
            finish(500, "error_500")
            log.exception("unhandled error while serving /v1/%s", record.endpoint)
            return await _send_error(
                send, 500, "internal proxy error; see the proxy's log", headers
            )
        if isinstance(answer, JsonAnswer):
            record.first_byte = time.monotonic()
            finish(200, "ok")
            return await _send_json(send, 200, answer.body, headers)
        await self._stream(answer, headers, record, finish, send)

    async def _stream(
        self,
        answer: StreamAnswer,
        headers: list[tuple[bytes, bytes]],
        record: RequestRecord,
        finish: Callable[[int, str], None],
        send: Send,
    ) -> None:
        relay = answer.chunks

        gaps = self.proxy.metrics.chunk_gaps(record.endpoint, record.mode)

        def closed() -> None:
            if relay.saw_done:
                record.chunks -= 1  # [DONE] is not a token
            gaps.flush()
            finish(200, "ok" if relay.saw_done else "stream_error")

        relay.add_close_callback(closed)
        gap = gaps.add
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE + headers})
            async for block in relay:
                # The client's view of the stream: when each write leaves, and how many
                # events (about one token each) it holds.
                now = time.monotonic()
                if record.last_chunk is None:
                    record.first_byte = now
                else:
                    gap(now - record.last_chunk)
                record.last_chunk = now
                record.chunks += block.count(b"\n\n")
                await send({"type": "http.response.body", "body": block, "more_body": True})
            await send(_END)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The status line is out: all that is left is to end the stream and say why.
            log.exception("unhandled error while relaying a stream")
        finally:
            relay.close()


class _DisconnectWatcher:
    """Cancels the request's task when the client goes away mid-request.

    Hypercorn only queues an ``http.disconnect`` message; without this the legs would run
    on (and a READ prefill's KV blocks would wait for a decode nobody reads).
    """

    def __init__(self, receive: Receive) -> None:
        self._request = asyncio.current_task()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self._request is not None:
                    self._request.cancel()
                return

    def stop(self) -> None:
        self._request = None
        self._task.cancel()


def _headers(
    scope: Scope, session_header: bytes
) -> tuple[str | None, int | None, str | None, str | None, bytes | None, int]:
    """The client's X-Request-Id, Content-Length, session header, W3C traceparent and
    Authorization (raw: the key check compares bytes), and the head's size
    (security.limits.head_size), in one pass."""
    request_id: str | None = None
    length: int | None = None
    session: str | None = None
    traceparent: str | None = None
    authorization: bytes | None = None
    size = len(scope["raw_path"]) + len(scope["query_string"])
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"traceparent":
            traceparent = value.decode("latin-1")
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"authorization":
            authorization = value
        elif name == session_header:
            session = value.decode("latin-1")
    return request_id, length, session, traceparent, authorization, size


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _read_body(receive: Receive, length: int | None, limit: int) -> bytes | None:
    """The whole request body; None when the client disconnected before sending it."""
    if length is not None and length > limit:
        raise _BodyError(413, f"request body of {length} bytes exceeds the limit of {limit}")
    message = await receive()
    body = message.get("body", b"")
    if message["type"] == "http.request" and not message.get("more_body", False):
        return bytes(body)  # the common case: the whole body in one message
    parts = [body]
    size = len(body)
    try:
        async with timeout_after(BODY_TIMEOUT):
            while message["type"] == "http.request" and message.get("more_body", False):
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _BodyError(413, f"request body exceeds the limit of {limit} bytes")
                parts.append(chunk)
    except asyncio.TimeoutError:
        raise _BodyError(408, f"the request body did not arrive within {BODY_TIMEOUT:g}s") from None
    if message["type"] == "http.disconnect":
        return None
    return b"".join(parts)


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    start = [_JSON, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    await _send_json(send, status, orjson.dumps(error_body(message, status)), headers)
