"""Prometheus collectors, one CollectorRegistry per app so tests never share counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

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
            "moriio_proxy_inflight_requests", "Client requests being served", registry=r
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
            "Requests refused before routing, by reason (over_capacity, draining)",
            ["reason"],
            registry=r,
        )
        self.instances = Gauge(
            "moriio_proxy_instances", "Registered instances by role", ["role"], registry=r
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

    def count_request(self, endpoint: str, outcome: str) -> None:
        """One more finished client request (the hot path's cached counter child)."""
        key = (endpoint, outcome)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(endpoint, outcome)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
