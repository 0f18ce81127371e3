"""Prometheus collectors, one CollectorRegistry per app so tests never share counters.

With ``serve --workers N`` every process counts what it does itself (the supervisor:
discovery; the workers: requests) in prometheus-client's multiprocess mode, and a scrape
of any worker adds them all up. What is a view of the registry (instances per role) is
not counted at all but read from the registry at scrape time, so it is never doubled by
the workers' mirrors and never outlives an instance.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

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


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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
            "moriio_proxy_request_seconds",
            "Time from request to last byte",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "moriio_proxy_prefill_seconds",
            "Duration of the prefill leg",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "moriio_proxy_first_byte_seconds",
            "Time from request to the first byte sent to the client",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        # Label lookups take a lock and validate; the request path reuses the children.
        self._request_counters: dict[tuple[str, str], Any] = {}
        self._views: list[_InstancesView] = []

    def count_request(self, endpoint: str, outcome: str) -> None:
        """One more finished client request (the hot path's cached counter child)."""
        key = (endpoint, outcome)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(endpoint, outcome)
        child.inc()

    def watch(self, roles: Callable[[], Iterable[str]]) -> None:
        """Export ``moriio_proxy_instances{role}`` from ``roles()`` (one role per
        registered instance), read at scrape time."""
        self._views.append(_InstancesView(roles))
        self.registry.register(self._views[-1])

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, directory)  # type: ignore[no-untyped-call]
        for view in self._views:
            merged.register(view)
        return generate_latest(merged)


class _InstancesView:
    """``moriio_proxy_instances{role}``: a gauge computed from the registry when scraped."""

    def __init__(self, roles: Callable[[], Iterable[str]]) -> None:
        self._roles = roles

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "moriio_proxy_instances", "Registered instances by role", labels=["role"]
        )
        counts = {"P": 0, "D": 0}
        for role in self._roles():
            counts[role] = counts.get(role, 0) + 1
        for role, count in counts.items():
            family.add_metric([role], count)
        yield family
