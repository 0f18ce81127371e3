"""OpenTelemetry spans for a request, its attempts and their legs (the ``otel`` extra).

Only imported when ``--otlp-traces-endpoint`` is set, so a proxy without tracing never
loads OpenTelemetry and its request path pays one ``is None`` check. Each leg carries a
W3C ``traceparent`` naming its span, so a vLLM started with its own
``--otlp-traces-endpoint`` reports its spans inside the proxy's trace; a client's own
``traceparent`` makes the request span its child.

    request (SERVER)
      attempt 1 (INTERNAL)   prefill leg (CLIENT)   decode leg (CLIENT)
      attempt 2 ...          (a retry on a fresh pair)
"""

from __future__ import annotations

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .record import RequestRecord

SERVICE = "moriio-proxy"
_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_exporter(endpoint: str) -> SpanExporter:
    """An OTLP/HTTP (protobuf) exporter to ``endpoint``, a collector's traces URL such as
    ``http://collector:4318/v1/traces``."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


class Tracing:
    """One tracer provider per proxy (never the process-global one, so tests and the
    workers of ``serve --workers N`` each own theirs)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("moriio_proxy")

    @classmethod
    def to_endpoint(cls, endpoint: str) -> Tracing:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter(endpoint)))
        return cls(provider)

    def request(self, endpoint: str, request_id: str, traceparent: str | None) -> RequestTrace:
        """The span of one client request, a child of the client's trace when it sent one."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self.tracer.start_span(
            f"POST /v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"moriio.endpoint": endpoint, "moriio.request_id": request_id},
        )
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter thread (blocking: run it off the
        event loop)."""
        self.provider.force_flush(timeout_millis=5000)
        self.provider.shutdown()


class LegSpan:
    """One leg's span and the ``traceparent`` header value that names it."""

    def __init__(self, span: Span) -> None:
        self.span = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
        self.traceparent = carrier.get("traceparent", "")
        self._open = True

    def end(self, error: str | None = None) -> None:
        """End the span (idempotent), marked failed with ``error``."""
        if not self._open:
            return
        self._open = False
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


class RequestTrace:
    """The spans of one request. The request path calls it only where ``record.trace`` is
    not None; everything it records comes from the request's ``RequestRecord``."""

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracer = tracing.tracer
        self.span = span
        self._attempt: LegSpan | None = None
        self._legs: list[LegSpan] = []

    def attempt(self, number: int, record: RequestRecord) -> None:
        """Start attempt ``number`` on the pair ``record`` names (ends the previous one)."""
        if self._attempt is not None:
            self._attempt.end()
        attributes: dict[str, str | int] = {"moriio.attempt": number, "moriio.mode": record.mode}
        if record.prefill is not None:
            attributes["moriio.prefill"] = record.prefill
        if record.rank is not None:
            attributes["moriio.dp_rank"] = record.rank
        if record.decode is not None:
            attributes["moriio.decode"] = record.decode
        span = self._tracer.start_span(
            f"attempt {number}",
            context=set_span_in_context(self.span),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        self._attempt = LegSpan(span)

    def fail_attempt(self, error: str) -> None:
        if self._attempt is not None:
            self._attempt.end(error)
            self._attempt = None

    def leg(self, name: str, address: str) -> LegSpan:
        """A span for the ``prefill`` or ``decode`` leg of the current attempt."""
        parent = self._attempt.span if self._attempt is not None else self.span
        span = self._tracer.start_span(
            f"{name} leg",
            context=set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes={"moriio.leg": name, "server.address": address},
        )
        leg = LegSpan(span)
        self._legs.append(leg)
        return leg

    def finish(self, record: RequestRecord) -> None:
        """End whatever is still open, then the request span with the request's outcome."""
        for leg in self._legs:
            leg.end()
        if self._attempt is not None:
            self._attempt.end()
        span = self.span
        span.set_attribute("http.response.status_code", record.status)
        span.set_attribute("moriio.outcome", record.outcome)
        span.set_attribute("moriio.attempts", record.attempts)
        span.set_attribute("moriio.mode", record.mode)
        if record.outcome not in ("ok", "cancelled"):
            span.set_status(Status(StatusCode.ERROR, record.outcome))
        span.end()
