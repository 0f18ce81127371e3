"""The phase histograms and per-instance series, read back from the collector registry."""

from __future__ import annotations

import pytest

from moriio_proxy.metrics import InstanceLoad, Metrics
from moriio_proxy.record import RequestRecord

PHASES = (
    "moriio_proxy_request_duration_seconds",
    "moriio_proxy_time_to_first_token_seconds",
    "moriio_proxy_prefill_duration_seconds",
    "moriio_proxy_decode_first_byte_seconds",
    "moriio_proxy_stream_chunks_per_second",
)


def finished(outcome: str = "ok", mode: str = "READ") -> RequestRecord:
    record = RequestRecord("chat", "r", 100.0)
    record.mode, record.outcome = mode, outcome
    record.prefill_seconds, record.decode_first_byte = 0.004, 0.2
    record.first_byte, record.last_chunk, record.chunks, record.ended = 100.3, 101.3, 21, 101.3
    return record


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_phase_is_observed_once_per_request_under_its_labels():
    metrics = Metrics()
    for _ in range(3):
        metrics.observe(finished())
    metrics.observe(finished("error_502"))
    labels = {"endpoint": "chat", "mode": "READ", "outcome": "ok"}
    for name in PHASES:
        assert sample(metrics, name + "_count", **labels) == 3, name
        assert sample(metrics, name + "_count", **{**labels, "outcome": "error_502"}) == 1
    ok = labels
    assert sample(metrics, "moriio_proxy_request_duration_seconds_sum", **ok) == pytest.approx(
        3 * 1.3
    )
    assert sample(metrics, "moriio_proxy_time_to_first_token_seconds_sum", **ok) == pytest.approx(
        0.9
    )
    assert sample(metrics, "moriio_proxy_prefill_duration_seconds_sum", **ok) == pytest.approx(
        0.012
    )
    assert sample(metrics, "moriio_proxy_decode_first_byte_seconds_sum", **ok) == pytest.approx(0.6)
    # 20 events after the first, over the second between the first and the last write.
    assert sample(metrics, "moriio_proxy_stream_chunks_per_second_sum", **ok) == pytest.approx(60)
    # The buckets start at 1 ms: a 4 ms prefill is above 2.5 ms and within 5 ms.
    assert sample(metrics, "moriio_proxy_prefill_duration_seconds_bucket", **ok, le="0.0025") == 0
    assert sample(metrics, "moriio_proxy_prefill_duration_seconds_bucket", **ok, le="0.005") == 3


def test_a_phase_the_request_never_reached_is_not_observed():
    metrics = Metrics()
    record = RequestRecord("completions", "r", 5.0)
    record.outcome, record.ended = "no_instances", 5.1
    metrics.observe(record)
    labels = {"endpoint": "completions", "mode": "none", "outcome": "no_instances"}
    assert sample(metrics, "moriio_proxy_request_duration_seconds_count", **labels) == 1
    for name in PHASES[1:]:
        assert sample(metrics, name + "_count", **labels) in (None, 0), name


def test_a_streams_gaps_reach_the_histogram_when_it_ends():
    metrics = Metrics()
    gaps = metrics.chunk_gaps("completions", "WRITE")
    for seconds in (0.01, 0.02, 0.5, 0.001, 1000.0):
        gaps.add(seconds)
    labels = {"endpoint": "completions", "mode": "WRITE"}
    name = "moriio_proxy_inter_chunk_seconds"
    assert sample(metrics, name + "_count", **labels) == 0  # nothing until the end
    gaps.flush()
    gaps.flush()  # a second flush adds nothing
    assert sample(metrics, name + "_count", **labels) == 5
    assert sample(metrics, name + "_sum", **labels) == pytest.approx(1000.531)
    assert sample(metrics, name + "_bucket", **labels, le="0.001") == 1  # le is inclusive
    assert sample(metrics, name + "_bucket", **labels, le="0.01") == 2
    assert sample(metrics, name + "_bucket", **labels, le="0.025") == 3
    assert sample(metrics, name + "_bucket", **labels, le="600.0") == 4
    assert sample(metrics, name + "_bucket", **labels, le="+Inf") == 5


def test_the_fast_observer_fills_the_same_buckets_as_prometheus_client():
    fast, plain = Metrics(), Metrics()
    values = [0.0, 0.001, 0.0011, 0.0025, 0.3, 1.0, 2.5, 59.9, 600.0, 601.0]
    for value in values:
        record = finished()
        record.prefill_seconds = value
        fast.observe(record)
        plain.prefill_seconds.labels("chat", "READ", "ok").observe(value)

    def counts(metrics: Metrics) -> list[tuple[str, dict, float]]:
        family = metrics.prefill_seconds.collect()
        return [(s.name, s.labels, s.value) for m in family for s in m.samples
                if not s.name.endswith("_created")]  # fmt: skip

    assert counts(fast) == counts(plain)
    assert len(counts(fast)) == 21  # 19 buckets (+Inf too), the count and the sum


def test_instance_errors_count_per_address_and_leave_with_the_instance():
    metrics = Metrics()
    metrics.count_instance_error("P", "10.0.0.1:1", "timeout")
    metrics.count_instance_error("P", "10.0.0.1:1", "timeout")
    metrics.count_instance_error("P", "10.0.0.1:1", "connect")
    metrics.count_instance_error("D", "10.0.0.2:2", "status")
    name = "moriio_proxy_instance_errors_total"
    assert sample(metrics, name, role="P", address="10.0.0.1:1", kind="timeout") == 2
    assert sample(metrics, name, role="P", address="10.0.0.1:1", kind="connect") == 1
    metrics.forget_instance("P", "10.0.0.1:1")
    text = metrics.render().decode()
    assert "10.0.0.1:1" not in text
    assert sample(metrics, name, role="D", address="10.0.0.2:2", kind="status") == 1


def test_instance_gauges_are_read_from_the_registry_at_scrape_time():
    metrics = Metrics()
    fleet = [InstanceLoad("P", "10.0.0.1:1", 3), InstanceLoad("D", "10.0.0.2:2", 5)]
    metrics.watch(lambda: fleet)
    inflight = "moriio_proxy_instance_inflight"
    assert sample(metrics, inflight, role="P", address="10.0.0.1:1") == 3
    assert sample(metrics, "moriio_proxy_instances", role="D") == 1
    fleet.pop()  # the decode was evicted: its series goes with it
    assert sample(metrics, inflight, role="D", address="10.0.0.2:2") is None
    assert sample(metrics, "moriio_proxy_instances", role="D") == 0
