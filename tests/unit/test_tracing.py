"""Request, attempt and leg spans, and the traceparent each leg carries, with an
in-memory exporter."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from moriio_proxy.record import RequestRecord
from moriio_proxy.tracing import Tracing

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


def tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def paired(record: RequestRecord, prefill: str, decode: str) -> None:
    record.mode, record.prefill, record.rank, record.decode = "READ", prefill, 0, decode


def test_a_retried_request_is_one_trace_of_attempts_and_legs():
    traces, exporter = tracing()
    record = RequestRecord("completions", "client-7", 0.0)
    trace = traces.request("completions", "client-7", CLIENT_PARENT)

    record.attempts = 1
    paired(record, "p1:1", "d1:1")
    trace.attempt(1, record)
    failed = trace.leg("prefill", "p1:1")
    failed.end("connection refused")
    trace.fail_attempt("prefill leg to p1:1: connection refused")

    record.attempts = 2
    paired(record, "p2:1", "d1:1")
    trace.attempt(2, record)
    prefill = trace.leg("prefill", "p2:1")
    prefill.end()
    decode = trace.leg("decode", "d1:1")  # still open: the request's end closes it
    record.status, record.outcome = 200, "ok"
    trace.finish(record)

    spans = {s.name + (f" {s.attributes.get('server.address')}" if "leg" in s.name else ""): s
             for s in exporter.get_finished_spans()}  # fmt: skip
    assert set(spans) == {
        "POST /v1/completions",
        "attempt 1",
        "attempt 2",
        "prefill leg p1:1",
        "prefill leg p2:1",
        "decode leg d1:1",
    }
    request = spans["POST /v1/completions"]
    assert {s.context.trace_id for s in spans.values()} == {int(CLIENT_TRACE, 16)}
    assert request.parent is not None and request.parent.span_id == 0xB7AD6B7169203331
    assert request.kind is SpanKind.SERVER
    assert request.attributes["moriio.attempts"] == 2
    assert request.attributes["http.response.status_code"] == 200
    for number in (1, 2):
        assert spans[f"attempt {number}"].parent.span_id == request.context.span_id
    assert spans["attempt 1"].status.status_code is StatusCode.ERROR
    assert spans["attempt 2"].attributes["moriio.prefill"] == "p2:1"
    assert spans["prefill leg p1:1"].parent.span_id == spans["attempt 1"].context.span_id
    assert spans["prefill leg p1:1"].status.status_code is StatusCode.ERROR
    for leg in ("prefill leg p2:1", "decode leg d1:1"):
        assert spans[leg].parent.span_id == spans["attempt 2"].context.span_id
        assert spans[leg].kind is SpanKind.CLIENT
    # Each leg's header names that leg's span in the client's trace.
    for handle, name in ((prefill, "prefill leg p2:1"), (decode, "decode leg d1:1")):
        span_id = f"{spans[name].context.span_id:016x}"
        assert handle.traceparent == f"00-{CLIENT_TRACE}-{span_id}-01"


def test_without_a_client_traceparent_the_request_starts_a_trace():
    traces, exporter = tracing()
    record = RequestRecord("chat", "r", 0.0)
    trace = traces.request("chat", "r", None)
    record.status, record.outcome = 502, "error_502"
    trace.finish(record)
    [span] = exporter.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.parent is None
    assert span.status.status_code is StatusCode.ERROR


def test_a_malformed_client_traceparent_is_ignored():
    traces, exporter = tracing()
    trace = traces.request("chat", "r", "not-a-traceparent")
    trace.finish(RequestRecord("chat", "r", 0.0))
    [span] = exporter.get_finished_spans()
    assert span.parent is None
