"""One request's way to an answer: choose a pair, try it, retry on a fresh pair.

An attempt on one pair (both legs, READ serial or WRITE concurrent) is ``attempt``'s; this
module decides what a failed attempt means: which instance to blame, whether another pair
could do better while no byte has reached the client, and what the client is told when
none can.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

from .answer import JsonAnswer, ProxyError, StreamAnswer
from .attempt import Attempts, LegFailure, new_nonce
from .compat import timeout_after
from .metrics import Metrics
from .pairing import NoPairError, Pair, PairChooser
from .policies import DecodePolicy, PrefillPolicy, RoutingContext, routing_context
from .protocol import ClientRequest
from .record import RequestRecord
from .registry import Registry
from .relay import public_message
from .upstream import Upstream, UpstreamError, UpstreamKvLoadError, UpstreamStatusError

__all__ = ["Disaggregator", "JsonAnswer", "ProxyError", "StreamAnswer", "client_id", "new_nonce"]

log = logging.getLogger("moriio_proxy.disagg")

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_INTERNAL_ID_RE = re.compile(r"___prefill_addr_.*?___decode_addr_.*?_[0-9a-f]{32}")


def client_id(header: str | None) -> str:
    """The id the client will see: its own X-Request-Id when that is safe to echo."""
    if header and _CLIENT_ID_RE.fullmatch(header):
        return header
    return new_nonce()


class Disaggregator:
    def __init__(
        self,
        registry: Registry,
        upstream: Upstream,
        metrics: Metrics,
        *,
        prefill_policy: PrefillPolicy,
        decode_policy: DecodePolicy,
        max_retries: int,
        retry_backoff: float = 0.05,
        request_timeout: float = 1800.0,
        release_grace: float = 1.0,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.pairs = PairChooser(registry, prefill_policy, decode_policy)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.request_timeout = request_timeout
        self.release_grace = release_grace
        self._reads = prefill_policy.reads | decode_policy.reads
        self.attempts = Attempts(registry, upstream, metrics, release_grace)

    async def handle(
        self,
        request: ClientRequest,
        public_suffix: str,
        session: str | None = None,
        record: RequestRecord | None = None,
    ) -> JsonAnswer | StreamAnswer:
        """Serve one client request; raise ProxyError for anything the client must be told.

        ``session`` is the client's session header, for session affinity; ``record``
        collects what the request did (pair, attempts, phase timings) for the metrics,
        the access log and the trace. Everything up to the first byte runs under the
        request's end-to-end deadline; the stream after it carries the same deadline
        into the relay.
        """
        now = time.monotonic()
        deadline = now + self.request_timeout
        context = routing_context(request, session, self._reads)
        if record is None:
            record = RequestRecord(request.endpoint, public_suffix, now)
        try:
            async with timeout_after(self.request_timeout):
                return await self._serve(request, public_suffix, deadline, context, record)
        except asyncio.TimeoutError:
            self.metrics.upstream_errors.labels("request", "deadline").inc()
            raise ProxyError(
                504, f"the request exceeded its {self.request_timeout:g}s deadline"
            ) from None

    async def _serve(
        self,
        request: ClientRequest,
        suffix: str,
        deadline: float,
        context: RoutingContext,
        record: RequestRecord,
    ) -> JsonAnswer | StreamAnswer:
        """Try pairs until one answers. A failure before any byte reached the client is
        retried on a fresh pair without the failed instance, up to ``max_retries`` times
        with exponential backoff; an engine's own 4xx is the client's answer, not a fault.
        """
        excluded: set[tuple[str, str]] = set()
        attempt = 0
        pair = self._choose(excluded, context)
        while True:
            record.attempts = attempt + 1
            try:
                return await self.attempts.run(request, pair, suffix, deadline, record)
            except LegFailure as failure:
                if record.trace is not None:
                    record.trace.fail_attempt(str(failure))
                self._account(failure)
                if not _retryable(failure.error) or attempt >= self.max_retries:
                    raise _client_error(failure, suffix) from None
                excluded.add(failure.entry.instance.key)
                try:
                    pair = self._choose(excluded, context)
                except ProxyError:  # no fresh pair: the failure is the better answer
                    raise _client_error(failure, suffix) from None
                attempt += 1
                self.metrics.retries.inc()
                await asyncio.sleep(self._backoff(attempt))

    def _account(self, failure: LegFailure) -> None:
        error, entry = failure.error, failure.entry
        self.metrics.upstream_errors.labels(failure.leg, error.kind).inc()
        if _retryable(error):  # an engine's 4xx judges the request, not the instance
            self.metrics.count_instance_error(
                entry.instance.role, entry.instance.http_address, error.kind
            )
        log.warning(
            "%s leg to %s failed (%s): %s",
            failure.leg,
            entry.instance.http_address,
            error.kind,
            error.message,
        )
        if isinstance(error, UpstreamKvLoadError):
            # The decode reported the failure but is rarely its cause (it usually queued
            # the request longer than the prefill's defer_timeout, or its allocation was
            # lost on the way to the prefill): no step toward ejecting it. docs/protocol.md
            # section 7.6.
            self.metrics.kv_load_failures.labels("before_first_byte").inc()
        elif not _retryable(error):
            self.registry.report_success(entry)  # it answered; the request was at fault
        elif self.registry.report_failure(entry):
            self.metrics.ejections.labels(entry.instance.role).inc()
            log.error(
                "ejected %s instance %s for %gs after %d consecutive failures",
                entry.instance.role,
                entry.instance.http_address,
                self.registry.eject_seconds,
                entry.failures,
            )

    def _backoff(self, attempt: int) -> float:
        return min(2.0, self.retry_backoff * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.5)

    # ------------------------------------------------------------------ choosing a pair

    def _choose(self, excluded: set[tuple[str, str]], context: RoutingContext) -> Pair:
        """A pair that can work (docs/protocol.md §8.2); a 503 saying why when none can."""
        try:
            return self.pairs.choose(excluded, context)
        except NoPairError as exc:
            raise ProxyError(503, str(exc), headers={"Retry-After": "1"}) from None

    async def close(self) -> None:
        """Finish background work (shutdown)."""
        await self.attempts.close()


def _retryable(error: UpstreamError) -> bool:
    """Whether another pair could do better: anything but the engine refusing the request."""
    return not (isinstance(error, UpstreamStatusError) and 400 <= error.status < 500)


def _client_error(failure: LegFailure, suffix: str) -> ProxyError:
    error = failure.error
    if isinstance(error, UpstreamStatusError) and 400 <= error.status < 500:
        # The engine judged the request itself (too long, bad parameter): pass it through.
        payload = error.payload if isinstance(error.payload, dict) else None
        inner = payload.get("error") if payload else None
        param = inner.get("param") if isinstance(inner, dict) else None
        return ProxyError(error.status, _INTERNAL_ID_RE.sub(suffix, error.message), param=param)
    status = 504 if error.kind == "timeout" else 502
    return ProxyError(status, f"the {failure.leg} instance failed: {public_message(error)}")
