"""One attempt at a request on a chosen prefill/decode pair: both legs, and their cleanup.

READ mode is strictly serial (decode needs the block ids prefill returns); WRITE mode
sends both legs at once (decode allocates and tells prefill where to write). In both,
the prefill answer is awaited and checked before a byte reaches the client, so a failed
prefill becomes one clear error and never a decode that waits forever for KV. A leg that
fails raises ``LegFailure``; whether to try another pair is ``disagg``'s decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from .answer import JsonAnswer, ProxyError, StreamAnswer
from .metrics import Metrics
from .pairing import Pair
from .protocol import (
    ClientRequest,
    Instance,
    Leg,
    TransferMode,
    build_decode_leg,
    build_prefill_leg,
    check_read_params,
    new_request_id,
    new_transfer_id,
    prefill_as_answer,
)
from .record import RequestRecord
from .registry import Entry, Registry
from .relay import DONE, Relay, Scrubber, error_status, sse_event
from .tasks import BackgroundTasks
from .upstream import Upstream, UpstreamError, UpstreamKvLoadError, UpstreamStatusError
from .versions import is_kv_load_failure, maps_write_tp

if TYPE_CHECKING:
    from .tracing import LegSpan

log = logging.getLogger("moriio_proxy.disagg")

_T = TypeVar("_T")


class LegFailure(Exception):
    """An UpstreamError plus which leg and instance it came from (for retries and logs)."""

    def __init__(self, leg: str, entry: Entry, error: UpstreamError) -> None:
        super().__init__(f"{leg} leg to {entry.instance.http_address}: {error.message}")
        self.leg = leg
        self.entry = entry
        self.error = error


def new_nonce() -> str:
    """32 random hex digits: the per-request part of the transfer and request ids.

    They must not collide, not be secret (they only ever travel to our own instances),
    so a 128-bit draw from the PRNG does, without a getrandom() system call per request.
    """
    return f"{random.getrandbits(128):032x}"


class Attempts:
    """Runs one attempt on a pair; owns the background work (KV release) attempts leave."""

    def __init__(
        self, registry: Registry, upstream: Upstream, metrics: Metrics, release_grace: float
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.release_grace = release_grace
        # Strong references to fire-and-forget work (KV release after a disconnect).
        self._background = BackgroundTasks()

    async def run(
        self,
        request: ClientRequest,
        pair: Pair,
        suffix: str,
        deadline: float,
        record: RequestRecord,
    ) -> JsonAnswer | StreamAnswer:
        """Attempt ``record.attempts`` (counted by the caller) on ``pair``."""
        mode = pair.mode
        p, d = pair.prefill.instance, pair.decode.instance
        record.mode, record.prefill, record.rank, record.decode = (
            mode,
            p.http_address,
            pair.rank,
            d.http_address,
        )
        record.prefill_seconds = record.decode_first_byte = None  # this attempt's, not the last
        trace = record.trace
        if trace is not None:
            trace.attempt(record.attempts, record)
        nonce = new_nonce()
        transfer_id = new_transfer_id(nonce)
        request_id = new_request_id(p, d, nonce)
        scrub = Scrubber(request_id, suffix, request.endpoint)
        prefill_leg = build_prefill_leg(
            request, p, d, transfer_id=transfer_id, request_id=request_id, dp_rank=pair.rank
        )

        def decode_leg(params: dict[str, Any] | None) -> Any:
            return build_decode_leg(
                request,
                p,
                d,
                mode=mode,
                transfer_id=transfer_id,
                request_id=request_id,
                dp_rank=pair.rank,
                prefill_params=params,
            )

        if mode == "READ":
            payload = await self._prefill(pair, prefill_leg, record)
            params = self._usable_params(payload, request, p, transfer_id, mode)
            if params is None:
                return self._prefill_answer(payload, request, scrub)
            # From here P holds KV blocks for this decode: the leg is always delivered, so
            # even a client that leaves now ends with D releasing them (see _decode).
            return await self._decode(
                request, pair, decode_leg(params), scrub, deadline, record, deliver=True
            )
        legs = (prefill_leg, decode_leg(None))
        return await self._write(request, pair, legs, scrub, deadline, record)

    async def _prefill(self, pair: Pair, leg: Leg, record: RequestRecord) -> dict[str, Any]:
        """The prefill leg; its duration goes into ``record`` whether it worked or not."""
        span = None
        if record.trace is not None:
            span = record.trace.leg("prefill", pair.prefill.instance.http_address)
            leg = with_traceparent(leg, span.traceparent)
        started = time.monotonic()
        with self.registry.track(pair.prefill, pair.rank):
            try:
                payload = await self.upstream.post_json(leg, self.upstream.timeouts.prefill)
            except UpstreamError as exc:
                record.prefill_seconds = time.monotonic() - started
                if span is not None:
                    span.end(exc.message)
                raise LegFailure("prefill", pair.prefill, exc) from None
        record.prefill_seconds = time.monotonic() - started
        if span is not None:
            span.end()
        self.registry.report_success(pair.prefill)
        return payload

    async def _write(
        self,
        request: ClientRequest,
        pair: Pair,
        legs: tuple[Leg, Leg],
        scrub: Scrubber,
        deadline: float,
        record: RequestRecord,
    ) -> JsonAnswer | StreamAnswer:
        """Both legs (prefill, decode) at once; the answer waits for prefill's verdict
        before any byte."""
        p_task = asyncio.ensure_future(self._prefill(pair, legs[0], record))
        d_task = asyncio.ensure_future(
            self._decode(request, pair, legs[1], scrub, deadline, record)
        )
        answer: JsonAnswer | StreamAnswer | None = None
        try:
            while not p_task.done():
                running = {t for t in (p_task, d_task) if not t.done()}
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if d_task.done() and d_task.exception() is not None:
                    await d_task  # decode failed first: report it; prefill is cancelled below
            payload = await p_task
            if self._usable_params(payload, request, pair.prefill.instance, "", "WRITE") is None:
                return self._prefill_answer(payload, request, scrub)
            answer = await d_task
            return answer
        finally:
            await self._abandon(p_task, d_task, keep=answer)

    async def _abandon(
        self, p_task: asyncio.Future[Any], d_task: asyncio.Future[Any], keep: Any
    ) -> None:
        """Cancel whatever leg is still running and free a decode answer nobody will read.

        A WRITE decode cancelled before its KV arrived is counted: vLLM keeps its
        blocks (docs/protocol.md §6.2).
        """
        if not d_task.done():
            self.metrics.decode_aborted_before_kv.inc()
        p_task.cancel()
        d_task.cancel()
        await asyncio.gather(p_task, d_task, return_exceptions=True)
        if d_task.cancelled() or d_task.exception() is not None:
            return
        unused = d_task.result()
        if unused is not keep and isinstance(unused, StreamAnswer):
            unused.chunks.close()

    def _usable_params(
        self,
        payload: dict[str, Any],
        request: ClientRequest,
        prefill: Instance,
        transfer_id: str,
        mode: TransferMode,
    ) -> dict[str, Any] | None:
        """P's kv_transfer_params, or None when P's answer is already the whole answer.

        A null with a length-capped token means the prefill is not acting as a KV
        producer (no connector, wrong kv_role): answering with its one token would
        silently truncate the client's answer, so that is an error.
        """
        params: dict[str, Any] | None = payload.get("kv_transfer_params")
        if params is None:
            if _finished_by_itself(payload) or _wanted_tokens(request.body) == 1:
                self.metrics.null_kv_params.inc()
                return None
            raise ProxyError(
                502,
                "the prefill instance returned no kv_transfer_params although the request "
                "was not finished; check that it runs MoRIIOConnector with "
                "kv_role kv_producer",
            )
        if mode == "READ":
            problem = check_read_params(params, transfer_id)
            if problem is not None:
                log.error("prefill %s returned unusable params: %s", prefill.http_address, problem)
                raise ProxyError(
                    502, f"the prefill instance returned unusable kv_transfer_params: {problem}"
                )
        return params

    def _prefill_answer(
        self, payload: dict[str, Any], request: ClientRequest, scrub: Scrubber
    ) -> JsonAnswer | StreamAnswer:
        body = scrub.json(payload)
        if not request.stream:
            return JsonAnswer(orjson.dumps(body))
        events = [
            sse_event(c) for c in prefill_as_answer(body, request.endpoint, request.include_usage)
        ]
        return StreamAnswer(Relay.from_events([*events, DONE], scrub))

    async def _decode(
        self,
        request: ClientRequest,
        pair: Pair,
        leg: Leg,
        scrub: Scrubber,
        deadline: float,
        record: RequestRecord,
        *,
        deliver: bool = False,
    ) -> JsonAnswer | StreamAnswer:
        entry = pair.decode
        span = None
        if record.trace is not None:
            span = record.trace.leg("decode", entry.instance.http_address)
            leg = with_traceparent(leg, span.traceparent)
        sent = time.monotonic()
        # A WRITE decode of vLLM 0.33 or later fails a request whose KV cannot come
        # (docs/protocol.md §7.6, §10 row 6) instead of waiting forever.
        fails_kv_loads = pair.mode == "WRITE" and maps_write_tp(entry.release)
        stack = contextlib.ExitStack()
        stack.enter_context(self.registry.track(entry))
        if span is not None:
            stack.callback(span.end)  # a failure below ends it first, with the error
        try:
            if not request.stream:
                send = self.upstream.post(leg, self.upstream.timeouts.first_byte, deadline)
                try:
                    raw = await self._send(send, deliver, _ignore)
                    body = scrub.answer(raw, leg.url)
                except UpstreamError as exc:
                    raise _decode_failure(entry, exc, fails_kv_loads, span) from None
                record.decode_first_byte = time.monotonic() - sent
                self.registry.report_success(entry)
                return JsonAnswer(body)
            try:
                resp = await self._send(
                    self.upstream.open_stream(leg, deadline), deliver, Upstream.abort
                )
            except UpstreamError as exc:
                raise _decode_failure(entry, exc, fails_kv_loads, span) from None
            stack.callback(resp.close)
            relay = Relay(resp, scrub, stack)
            try:
                await relay.prime()
            except UpstreamError as exc:
                raise _decode_failure(entry, exc, fails_kv_loads, span) from None
            record.decode_first_byte = time.monotonic() - sent
            self.registry.report_success(entry)
            if fails_kv_loads:
                relay.on_error_event = self._error_after_first_byte
            stack = contextlib.ExitStack()  # the relay owns the cleanup now
            return StreamAnswer(relay)
        finally:
            stack.close()

    def _error_after_first_byte(self, error: dict[str, Any]) -> None:
        """An error event a WRITE decode sent once the stream had started: it reaches the
        client as it is (the status is long gone); counted when it is a failed KV load."""
        if is_kv_load_failure(error_status(error), error):
            self.metrics.kv_load_failures.labels("after_first_byte").inc()

    async def _send(
        self, call: Coroutine[Any, Any, _T], deliver: bool, discard: Callable[[_T], None]
    ) -> _T:
        """Await an upstream call; with ``deliver``, a cancelled caller does not cancel it
        at once but lets it reach the instance first (see ``_linger``), and ``discard``
        frees what it returns once nobody wants it."""
        if not deliver:
            return await call
        task = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._background.spawn(self._linger(task, discard), name="kv-release")
            raise

    async def _linger(self, task: asyncio.Future[_T], discard: Callable[[_T], None]) -> None:
        """Give an abandoned READ decode leg a moment to reach D, then abort it there.

        P keeps a finished prefill's KV blocks until D reads or releases them (or P's
        defer_timeout, 60 s, passes). A decode request that D received and that is then
        aborted makes D release them at once; one that never left the proxy would not.
        A streaming leg is aborted as soon as its response head proves D has it; a
        non-streaming one after ``release_grace`` (its head only comes at the end).
        """
        self.metrics.kv_release_legs.inc()
        await asyncio.wait({task}, timeout=self.release_grace)
        task.cancel()
        with contextlib.suppress(BaseException):
            discard(await task)

    async def close(self) -> None:
        """Finish background work (shutdown)."""
        await self._background.cancel_all()


def _ignore(_: object) -> None:
    """Nothing to free: a JSON answer is already read and released."""


def with_traceparent(leg: Leg, traceparent: str) -> Leg:
    """The leg carrying a W3C trace context, so vLLM's spans join the proxy's trace."""
    return replace(leg, headers={**leg.headers, "traceparent": traceparent})


def _decode_failure(
    entry: Entry, error: UpstreamError, fails_kv_loads: bool, span: LegSpan | None
) -> LegFailure:
    """A failed decode leg; a failed KV load is told apart when the decode can report one."""
    if span is not None:
        span.end(error.message)
    if (
        fails_kv_loads
        and isinstance(error, UpstreamStatusError)
        and is_kv_load_failure(error.status, error.payload)
    ):
        error = UpstreamKvLoadError(
            f"{error.url or 'the decode instance'} failed the request's KV load "
            f"(HTTP {error.status}: {error.message})",
            url=error.url,
        )
    return LegFailure("decode", entry, error)


def _finished_by_itself(payload: dict[str, Any]) -> bool:
    choices = payload.get("choices") or []
    return bool(choices) and all(c.get("finish_reason") not in (None, "length") for c in choices)


def _wanted_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
