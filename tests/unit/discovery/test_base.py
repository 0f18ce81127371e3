"""The discovery package's seams: the factory the app calls, and what both sources share.

No sockets: sources are built, not started (register_static needs no listener).
"""

from __future__ import annotations

import ipaddress
import logging

import msgpack
import pytest

from moriio_proxy.config import ProxyConfig
from moriio_proxy.discovery import Discovery, DiscoverySource, make_discovery
from moriio_proxy.metrics import Metrics
from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry


def instance(role: str, host: str, mode: str = "READ") -> Instance:
    return Instance(
        role=role,  # type: ignore[arg-type]
        http_address=f"{host}:20005",
        kv_host=host,
        handshake_port=6301,
        notify_port=6105,
        dp_size=1,
        tp_size=1,
        transfer_mode=mode,  # type: ignore[arg-type]
    )


def counted(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(f"moriio_proxy_{name}_total", labels) or 0.0


def test_zmq_is_the_default_source_and_takes_its_settings_from_config() -> None:
    static = (instance("P", "10.0.0.1"),)
    config = ProxyConfig(
        discovery_host="127.0.0.1",
        discovery_port=0,
        discovery_allow=(ipaddress.ip_network("10.0.0.0/8"),),
        static_instances=static,
    )
    source = make_discovery(config, Registry(10.0), Metrics())
    assert isinstance(source, Discovery) and isinstance(source, DiscoverySource)
    assert (source.host, source.port) == ("127.0.0.1", 0)
    assert source.allow == config.discovery_allow
    assert source.static == static
    assert source.bound_port is None  # not started: nothing bound yet


def test_kubernetes_source_takes_its_settings_from_config() -> None:
    pytest.importorskip("kubernetes_asyncio", reason="needs the k8s extra (kubernetes-asyncio)")
    from moriio_proxy.discovery.kubernetes.source import KubernetesDiscovery

    config = ProxyConfig(
        discovery="kubernetes",
        k8s_namespace="",
        k8s_prefill_selector="tier=p",
        k8s_api_url="http://127.0.0.1:8001",
        static_instances=(instance("D", "10.0.0.2"),),
    )
    source = make_discovery(config, Registry(10.0), Metrics())
    assert isinstance(source, KubernetesDiscovery)
    assert source.namespace is None  # "" means the proxy's own, resolved at start
    assert source.selectors == {"P": "tier=p", "D": "moriio.io/role=decode"}
    assert source.api_url == "http://127.0.0.1:8001"
    assert source.static == config.static_instances
    assert source.bound_port is None  # it listens on nothing
    assert source.resource_versions == {"P": None, "D": None}


def test_a_source_must_implement_start_and_stop() -> None:
    with pytest.raises(TypeError):
        DiscoverySource(Registry(10.0), Metrics(), static=(), logger=logging.getLogger())  # type: ignore[abstract]


def test_static_instances_register_and_a_conflicting_one_is_refused_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, metrics = Registry(10.0), Metrics()
    good, bad = instance("P", "10.0.0.1"), instance("D", "10.0.0.2", mode="WRITE")
    source = Discovery(registry, metrics, host="127.0.0.1", port=0, static=(good, bad))
    with caplog.at_level(logging.ERROR, logger="moriio_proxy.discovery"):
        source.register_static()
    assert [(e.instance, e.static) for e in registry.entries()] == [(good, True)]
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("REFUSED D instance 10.0.0.2:20005: transfer_mode WRITE")
    assert "READ in force" in message and "config file" in message
    # Static instances are configuration, not discoveries: the counters leave them out.
    assert counted(metrics, "registrations", {"result": "added"}) == 0
    assert counted(metrics, "registrations_rejected", {"reason": "mode_conflict"}) == 0
    # ... while a heartbeat, refused the same way, is counted.
    heartbeat = {
        "type": "D",
        "http_address": "10.0.0.3:20005",
        "zmq_address": "host:10.0.0.3,handshake:6301,notify:6105",
        "dp_size": 1,
        "tp_size": 1,
        "transfer_mode": "WRITE",
    }
    assert source.accept([b"id", msgpack.packb(heartbeat)]) == "conflict"
    assert counted(metrics, "registrations_rejected", {"reason": "mode_conflict"}) == 1
    assert source.accept([b"id", msgpack.packb({**heartbeat, "transfer_mode": "READ"})]) == "added"
    assert counted(metrics, "registrations", {"result": "added"}) == 1
