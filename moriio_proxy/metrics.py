"""Prometheus collectors, one CollectorRegistry per app so tests never share counters.

With ``serve --workers N`` every process counts what it does itself (the supervisor:
discovery; the workers: requests) in prometheus-client's multiprocess mode, and a scrape
of any worker adds them all up. What is a view of the registry (instances per role) is
not counted at all but read from the registry at scrape time, so it is never doubled by
the workers' mirrors and never outlives an instance.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from .record import RequestRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: str) -> None:
    """Make this process's metrics file-backed in ``directory`` (an empty folder shared by
    the supervisor and its workers). Call before the first ``Metrics()`` of the process;
    children inherit it through the environment."""
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client picks its value class when first imported; pick again now that
    # the directory is known, whatever imported it earlier.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


# From 1 ms (a cached one-token prefill on a fast network) to 10 minutes (a long stream).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# The labels of the phase histograms: two endpoints, READ/WRITE/none, and an outcome from
# a short list (ok, cancelled, stream_error, no_instances, error_<HTTP status>).
_PHASE_LABELS = ["endpoint", "mode", "outcome"]
_INSTANCE_LABELS = ["role", "address"]
_PER_INSTANCE = ("moriio_proxy_instance_errors",)


class InstanceLoad(NamedTuple):
    """One registered instance as the scrape-time views see it."""

    role: str
    address: str
    inflight: int


class Metrics:
    """Everything an operator graphs or alerts on, under the ``moriio_proxy_`` prefix."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "moriio_proxy_requests",
            "Client requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.inflight = Gauge(
            "moriio_proxy_inflight_requests",
            "Client requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "moriio_proxy_upstream_errors",
            "Failed upstream legs by leg (prefill/decode) and kind",
            ["leg", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "moriio_proxy_retries", "Requests retried on a fresh pair before any byte", registry=r
        )
        self.null_kv_params = Counter(
            "moriio_proxy_prefill_complete_answers",
            "Prefill legs that finished the request themselves (kv_transfer_params null)",
            registry=r,
        )
        self.decode_aborted_before_kv = Counter(
            "moriio_proxy_decode_aborted_before_kv",
            "WRITE-mode decode legs cancelled before their KV arrived; vLLM 0.32 keeps "
            "such a request's KV blocks until the engine restarts",
            registry=r,
        )
        self.kv_load_failures = Counter(
            "moriio_proxy_kv_load_failures",
            "Decode legs that failed their KV load (vLLM 0.33 WRITE mode: the prefill's "
            "write never happened), by when: before_first_byte (retried on a fresh pair) "
            "or after_first_byte (the client got an SSE error event)",
            ["when"],
            registry=r,
        )
        self.ejections = Counter(
            "moriio_proxy_ejections",
            "Instances taken out of rotation after consecutive failures",
            ["role"],
            registry=r,
        )
        self.kv_release_legs = Counter(
            "moriio_proxy_kv_release_legs",
            "READ decode legs delivered and aborted after the client left, so that the "
            "decode instance releases the prefill's KV blocks",
            registry=r,
        )
        self.rejected = Counter(
            "moriio_proxy_rejected_requests",
            "Requests refused before routing, by reason (over_capacity, draining, unauthorized, "
            "client_limit)",
            ["reason"],
            registry=r,
        )
        self.registrations = Counter(
            "moriio_proxy_registrations",
            "Accepted heartbeats by result (added, refreshed, updated)",
            ["result"],
            registry=r,
        )
        self.registrations_rejected = Counter(
            "moriio_proxy_registrations_rejected",
            "Discovery messages refused, by reason (mode_conflict, bad_msgpack, ...)",
            ["reason"],
            registry=r,
        )
        self.evictions = Counter(
            "moriio_proxy_evictions",
            "Instances removed after missing heartbeats",
            ["role"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "moriio_proxy_request_duration_seconds",
            "Time from a request's arrival to its last byte",
            _PHASE_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "moriio_proxy_time_to_first_token_seconds",
            "Time from a request's arrival to the first byte sent to the client (a stream's "
            "time to first token; a whole answer's latency)",
            _PHASE_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "moriio_proxy_prefill_duration_seconds",
            "Duration of the prefill leg of a request's last attempt",
            _PHASE_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_first_byte_seconds = Histogram(
            "moriio_proxy_decode_first_byte_seconds",
            "Time from sending the decode leg to its first answer (READ mode: includes the "
            "KV read; WRITE mode: the wait for the prefill's KV write)",
            _PHASE_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chunk_gap_seconds = Histogram(
            "moriio_proxy_inter_chunk_seconds",
            "Time between consecutive writes of a stream to the client",
            ["endpoint", "mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chunk_rate = Histogram(
            "moriio_proxy_stream_chunks_per_second",
            "SSE events per second of a stream after its first (about tokens per second)",
            _PHASE_LABELS,
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.instance_errors = Counter(
            "moriio_proxy_instance_errors",
            "Failed legs per instance, by kind (timeout, connect, status, ...); the series "
            "of an instance leave with it",
            [*_INSTANCE_LABELS, "kind"],
            registry=r,
        )

        # Label lookups take a lock and validate; the request path reuses the children.
        self._request_counters: dict[tuple[str, str], Any] = {}
        self._phases: dict[tuple[str, str, str], tuple[Observer, ...]] = {}
        self._gaps: dict[tuple[str, str], Observer] = {}
        self._instance_errors: dict[tuple[str, str], set[str]] = {}
        self._views: list[_InstancesView] = []

    def count_request(self, endpoint: str, outcome: str) -> None:
        """One more finished client request (the hot path's cached counter child)."""
        key = (endpoint, outcome)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(endpoint, outcome)
        child.inc()

    def observe(self, record: RequestRecord) -> None:
        """A finished request's phases into the histograms (cached children per label set)."""
        key = (record.endpoint, record.mode, record.outcome)
        children = self._phases.get(key)
        if children is None:
            children = self._phases[key] = tuple(
                Observer(h.labels(*key))
                for h in (
                    self.request_seconds,
                    self.first_byte_seconds,
                    self.prefill_seconds,
                    self.decode_first_byte_seconds,
                    self.chunk_rate,
                )
            )
        total, first_byte, prefill, decode, rate = children
        if record.ended is not None:
            total.observe(record.ended - record.started)
        if record.first_byte is not None:
            first_byte.observe(record.first_byte - record.started)
        if record.prefill_seconds is not None:
            prefill.observe(record.prefill_seconds)
        if record.decode_first_byte is not None:
            decode.observe(record.decode_first_byte)
        chunk_rate = record.chunk_rate()
        if chunk_rate is not None:
            rate.observe(chunk_rate)

    def chunk_gaps(self, endpoint: str, mode: str) -> GapTally:
        """A tally for one stream's gaps between writes, added to the histogram of its
        endpoint and mode by ``add_gaps`` when the stream ends."""
        key = (endpoint, mode)
        observer = self._gaps.get(key)
        if observer is None:
            observer = self._gaps[key] = Observer(self.chunk_gap_seconds.labels(endpoint, mode))
        return GapTally(observer)

    def count_instance_error(self, role: str, address: str, kind: str) -> None:
        """A failed leg on one instance (a failure path: no cached child needed)."""
        self.instance_errors.labels(role, address, kind).inc()
        self._instance_errors.setdefault((role, address), set()).add(kind)

    def forget_instance(self, role: str, address: str) -> None:
        """Drop an evicted instance's series so the per-address label stays bounded.

        prometheus-client cannot remove a series in multiprocess mode (its files keep
        every value a process wrote); there ``render`` leaves out the series of
        instances that are no longer registered instead.
        """
        kinds = self._instance_errors.pop((role, address), set())
        if multiprocess_dir() is None:
            for kind in kinds:
                self.instance_errors.remove(role, address, kind)

    def watch(self, instances: Callable[[], Iterable[InstanceLoad]]) -> None:
        """Export ``moriio_proxy_instances{role}`` and
        ``moriio_proxy_instance_inflight{role,address}`` from ``instances()``, read at
        scrape time, so they are never doubled by the workers' mirrors and never outlive
        an instance."""
        self._views.append(_InstancesView(instances))
        self.registry.register(self._views[-1])

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        files = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]
        live = {(v.role, v.address) for view in self._views for v in view.instances()}
        merged.register(_LiveInstancesOnly(files, live))
        for view in self._views:
            merged.register(view)
        return generate_latest(merged)


class Observer:
    """A histogram child's ``observe`` at a fraction of its cost, for the request path.

    prometheus-client finds an observation's bucket with a Python loop over the bounds
    (about 2 µs with 18 buckets); a C bisect over the same bounds finds the same bucket
    (the first with ``amount <= bound``) in a tenth of that. It writes the child's own
    values (``_upper_bounds``, ``_buckets``, ``_sum``, unchanged across prometheus-client
    releases for years), so the exposition, multiprocess files included, is the same;
    tests/unit/test_metrics.py reads the buckets back, and a release without them fails
    at the first ``Metrics()``, not silently.
    """

    __slots__ = ("_buckets", "_sum", "bounds")

    def __init__(self, child: Any) -> None:
        try:
            self.bounds: list[float] = list(child._upper_bounds)
            self._buckets: list[Any] = child._buckets
            self._sum: Any = child._sum
        except AttributeError:
            raise TypeError(
                "this prometheus-client's histograms lack _upper_bounds/_buckets/_sum"
            ) from None

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self.bounds, amount)].inc(1)

    def observe_many(self, counts: list[int], total: float) -> None:
        """``counts[i]`` observations in bucket ``i``, summing to ``total``, at once."""
        self._sum.inc(total)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class GapTally:
    """One stream's gaps between writes, counted per bucket as they happen (a bisect and
    an add per write: no lock, no multiprocess file write) and added to the histogram
    once, when the stream ends (``flush``)."""

    __slots__ = ("_bounds", "_counts", "_observer", "_total")

    def __init__(self, observer: Observer) -> None:
        self._observer = observer
        self._bounds = observer.bounds
        self._counts = [0] * len(self._bounds)
        self._total = 0.0

    def add(self, gap: float) -> None:
        self._counts[bisect_left(self._bounds, gap)] += 1
        self._total += gap

    def flush(self) -> None:
        """Add the tally to the histogram and start again from zero."""
        if any(self._counts):
            self._observer.observe_many(self._counts, self._total)
            self._counts = [0] * len(self._bounds)
            self._total = 0.0


class _InstancesView:
    """Gauges computed from the registry when scraped: instances per role, and each
    instance's legs in flight (under ``serve --workers N`` the supervisor's sum over
    workers, as of its last snapshot)."""

    def __init__(self, instances: Callable[[], Iterable[InstanceLoad]]) -> None:
        self.instances = instances

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "moriio_proxy_instances", "Registered instances by role", labels=["role"]
        )
        inflight = GaugeMetricFamily(
            "moriio_proxy_instance_inflight",
            "Legs in flight on each registered instance",
            labels=_INSTANCE_LABELS,
        )
        counts = {"P": 0, "D": 0}
        for view in self.instances():
            counts[view.role] = counts.get(view.role, 0) + 1
            inflight.add_metric([view.role, view.address], view.inflight)
        for role, count in counts.items():
            family.add_metric([role], count)
        yield family
        yield inflight


class _LiveInstancesOnly:
    """The multiprocess files' metrics without the per-instance series of instances that
    are gone (the files cannot forget them; the export can)."""

    def __init__(self, collector: Any, live: set[tuple[str, str]]) -> None:
        self._collector = collector
        self._live = live

    def collect(self) -> Iterable[Metric]:
        for family in self._collector.collect():
            if family.name in _PER_INSTANCE:
                family.samples = [
                    s
                    for s in family.samples
                    if (s.labels.get("role"), s.labels.get("address")) in self._live
                ]
            yield family
