"""Kubernetes discovery against a fake API server on loopback.

Each proxy replica must see every Ready P and D pod, and nothing else: not a pod that is
still loading, not one that is gone (even if its DELETED event was lost while the watch
was down), not one whose annotations would make the proxy send malformed legs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip(
    "kubernetes_asyncio",
    reason="Kubernetes discovery needs kubernetes-asyncio (pip install 'moriio-proxy[k8s]')",
)

from moriio_proxy.discovery.kubernetes.api import KubernetesConfigError
from moriio_proxy.discovery.kubernetes.source import KubernetesDiscovery
from moriio_proxy.metrics import Metrics
from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry
from tests.harness.kube import FakeKubeAPI, make_pod
from tests.harness.waiting import STATE_TIMEOUT, eventually


@dataclass
class Env:
    api: FakeKubeAPI
    registry: Registry
    metrics: Metrics
    discovery: KubernetesDiscovery
    removed: list[tuple[str, str, str]] = field(default_factory=list)

    async def seen(self, role: str, version: int) -> None:
        """Wait until discovery processed ``version`` on the watch of ``role``."""
        discovery = self.discovery
        await eventually(
            lambda: int(discovery.resource_versions[role] or 0) >= version  # type: ignore[index]
        )

    def get(self, role: str, address: str) -> Instance | None:
        for entry in self.registry.entries():
            if entry.instance.key == (role, address):
                return entry.instance
        return None

    def addresses(self, role: str) -> list[str]:
        return sorted(e.instance.http_address for e in self.registry.healthy(role))  # type: ignore[arg-type]

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "moriio_proxy_registrations_rejected_total", {"reason": reason}
        )
        return value or 0.0


Start = Callable[..., Awaitable[Env]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    envs: list[Env] = []

    async def _start(*pods: dict[str, Any], pinned: Any = None, **kwargs: Any) -> Env:
        api = FakeKubeAPI()
        for pod in pods:
            await api.put(pod)
        await api.start()
        registry = Registry(10.0, pinned_mode=pinned)
        metrics = Metrics()
        options: dict[str, Any] = {
            "namespace": "moriio",
            "api_url": api.url,
            "resync_interval": 0.05,
            "backoff_initial": 0.02,
            "backoff_max": 0.1,
            "watch_timeout": 30,
        }
        options.update(kwargs)
        discovery = KubernetesDiscovery(registry, metrics, **options)
        env = Env(api, registry, metrics, discovery)

        def removed(_sender: Any, entry: Any, reason: str = "", **_: Any) -> None:
            env.removed.append((entry.instance.role, entry.instance.http_address, reason))

        registry.instance_removed.connect(removed, sender=registry, weak=False)
        envs.append(env)
        await discovery.start()
        await asyncio.wait_for(discovery.ready.wait(), STATE_TIMEOUT)
        await api.wait_watching(2)
        return env

    yield _start
    for env in envs:
        await env.discovery.stop()
        await env.api.close()


# ------------------------------------------------------------------- list and watch


async def test_listed_pods_become_static_instances(start: Start) -> None:
    env = await start(
        make_pod("p0", "prefill", "10.0.0.1", dp=2, handshake=6301, notify=6105),
        make_pod("d0", "decode", "fd00::2", http=40005, handshake=7301, notify=7501, tp=4),
        make_pod("other", labels={"app": "something-else"}, ip="10.0.0.9"),
    )
    prefill = env.get("P", "10.0.0.1:20005")
    decode = env.get("D", "fd00::2:40005")
    assert prefill is not None and decode is not None
    assert (prefill.kv_host, prefill.handshake_port, prefill.notify_port) == (
        "10.0.0.1",
        6301,
        6105,
    )
    assert (prefill.dp_size, prefill.tp_size, prefill.transfer_mode) == (2, 1, "READ")
    assert decode.zmq_address == "host:fd00::2,handshake:7301,notify:7501"
    assert (decode.dp_size, decode.tp_size) == (1, 4)
    assert len(env.registry.entries()) == 2  # the unlabelled pod is not ours
    assert all(e.static for e in env.registry.entries())  # the watch is their liveness


async def test_readiness_decides_registration(start: Start) -> None:
    env = await start()
    await env.seen("P", await env.api.put(make_pod("p0", ready=False)))
    assert env.addresses("P") == []  # loading its model: no traffic yet

    await env.seen("P", await env.api.put(make_pod("p0", ready=True)))
    assert env.addresses("P") == ["10.0.0.1:20005"]

    await env.seen("P", await env.api.put(make_pod("p0", ready=False)))
    assert env.addresses("P") == []
    assert env.removed == [("P", "10.0.0.1:20005", "pod_not_ready")]

    await env.seen("P", await env.api.put(make_pod("p0", ready=True)))
    await env.seen("P", await env.api.put(make_pod("p0", ready=True, deleting=True)))
    assert env.addresses("P") == []  # terminating pods drain elsewhere


async def test_deleted_pod_is_removed(start: Start) -> None:
    env = await start(make_pod("d0", "decode", "10.0.0.2"))
    assert env.addresses("D") == ["10.0.0.2:20005"]
    await env.seen("D", await env.api.delete("d0"))
    assert env.addresses("D") == []
    assert env.removed == [("D", "10.0.0.2:20005", "pod_deleted")]


async def test_pod_leaving_the_selector_is_removed(start: Start) -> None:
    env = await start(make_pod("p0"))
    version = await env.api.put(make_pod("p0", labels={"moriio.io/role": "standby"}))
    await env.seen("P", version)
    assert env.addresses("P") == []


async def test_ip_or_port_change_updates_the_instance(start: Start) -> None:
    env = await start(make_pod("p0", ip="10.0.0.1"))
    await env.seen("P", await env.api.put(make_pod("p0", ip="10.0.0.9")))
    assert env.addresses("P") == ["10.0.0.9:20005"]
    assert env.removed == [("P", "10.0.0.1:20005", "pod_moved")]

    await env.seen("P", await env.api.put(make_pod("p0", ip="10.0.0.9", handshake=6401)))
    instance = env.get("P", "10.0.0.9:20005")
    assert instance is not None and instance.handshake_port == 6401
    assert len(env.removed) == 1  # same address: updated in place, counters kept


async def test_an_address_two_pods_claim_outlives_the_first(start: Start) -> None:
    # hostNetwork: a replacement pod on the same node announces the same IP:port.
    env = await start(make_pod("p-old", ip="10.0.0.1"))
    await env.seen("P", await env.api.put(make_pod("p-new", ip="10.0.0.1", handshake=6401)))
    await env.seen("P", await env.api.delete("p-old"))
    instance = env.get("P", "10.0.0.1:20005")
    assert instance is not None and instance.handshake_port == 6401
    assert env.removed == []


async def test_resync_restores_an_entry_removed_behind_its_back(start: Start) -> None:
    env = await start(make_pod("p0"))
    env.registry.remove(("P", "10.0.0.1:20005"), reason="test")
    await eventually(lambda: env.addresses("P") == ["10.0.0.1:20005"])


async def test_bad_annotations_are_skipped_logged_and_counted(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "moriio_proxy.discovery.kubernetes")
    env = await start(
        make_pod("p-missing", ip="10.0.0.1", drop=("notify-port",)),
        make_pod("p-mode", ip="10.0.0.2", mode="FAST"),
        make_pod("d0", "decode", "10.0.0.3"),
    )
    assert env.addresses("P") == []
    assert env.rejected("k8s_bad_annotations") == 2
    assert "p-missing" in caplog.text and "moriio.io/notify-port" in caplog.text
    assert "p-mode" in caplog.text and "moriio.io/transfer-mode" in caplog.text

    # Fixed by `kubectl annotate`: registered.
    await env.seen("P", await env.api.put(make_pod("p-mode", ip="10.0.0.2")))
    assert env.addresses("P") == ["10.0.0.2:20005"]
    # Broken again: removed, counted once more.
    await env.seen("P", await env.api.put(make_pod("p-mode", ip="10.0.0.2", http="x")))
    assert env.addresses("P") == []
    assert env.removed[-1] == ("P", "10.0.0.2:20005", "pod_bad_annotations")
    assert env.rejected("k8s_bad_annotations") == 3

    # A re-list sees the same pod versions: not counted again.
    await env.api.drop_watches(abort=True)
    await eventually(lambda: env.api.list_calls >= 4)
    await env.api.wait_watching(2)
    assert env.rejected("k8s_bad_annotations") == 3


async def test_dropped_stream_relists_and_removes_what_vanished(start: Start) -> None:
    env = await start(make_pod("p0", ip="10.0.0.1"), make_pod("p1", ip="10.0.0.2"))
    lists = env.api.list_calls
    env.api.lists_open.clear()  # hold the re-list until the pod is gone
    await env.api.drop_watches(abort=True)  # connection cut: no final chunk
    await eventually(lambda: env.api.list_calls > lists)
    await env.api.delete("p1")
    env.api.compact()  # the DELETED event is not replayable either
    env.api.lists_open.set()
    await eventually(lambda: env.addresses("P") == ["10.0.0.1:20005"])
    assert ("P", "10.0.0.2:20005", "pod_gone") in env.removed
    await env.api.wait_watching(2)  # and watching again

    await env.seen("P", await env.api.put(make_pod("p2", ip="10.0.0.3")))
    assert env.addresses("P") == ["10.0.0.1:20005", "10.0.0.3:20005"]


async def test_clean_end_resumes_from_the_last_version(start: Start) -> None:
    env = await start(make_pod("p0", ip="10.0.0.1"), make_pod("p1", ip="10.0.0.2"))
    lists = env.api.list_calls
    env.api.watches_open.clear()
    await env.api.drop_watches(abort=False)  # as at the server's timeout
    await env.api.delete("p1")  # happens while nobody watches
    env.api.watches_open.set()
    await eventually(lambda: env.addresses("P") == ["10.0.0.1:20005"])
    assert env.removed == [("P", "10.0.0.2:20005", "pod_deleted")]  # replayed event
    assert env.api.list_calls == lists  # resumed, no re-list needed


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_gone_triggers_a_relist(start: Start, as_http: bool) -> None:
    env = await start(make_pod("p0", ip="10.0.0.1"), make_pod("p1", ip="10.0.0.2"))
    env.api.gone_as_http = as_http
    lists = env.api.list_calls
    env.api.watches_open.clear()
    await env.api.drop_watches(abort=False)
    await env.api.delete("p1")
    env.api.compact()  # resuming from the old version now answers 410 Gone
    env.api.watches_open.set()
    await eventually(lambda: env.addresses("P") == ["10.0.0.1:20005"])
    assert env.removed == [("P", "10.0.0.2:20005", "pod_gone")]
    assert env.api.list_calls > lists


async def test_api_errors_are_retried_until_the_first_list(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "moriio_proxy.discovery.kubernetes")
    api = FakeKubeAPI()
    api.list_failures = [403, 500, 503]
    await api.put(make_pod("p0"))
    await api.put(make_pod("d0", "decode", "10.0.0.2"))
    await api.start()
    registry = Registry(10.0)
    discovery = KubernetesDiscovery(
        registry, Metrics(), namespace="moriio", api_url=api.url, backoff_initial=0.02
    )
    try:
        await discovery.start()
        await asyncio.wait_for(discovery.ready.wait(), STATE_TIMEOUT)
        assert len(registry.entries()) == 2
        assert "HTTP 403" in caplog.text and "Role and RoleBinding" in caplog.text
    finally:
        await discovery.stop()
        await api.close()


async def test_mode_conflict_is_refused_then_retried(start: Start) -> None:
    env = await start(
        make_pod("p0", ip="10.0.0.1", mode="READ"),
        make_pod("d0", "decode", "10.0.0.2", mode="WRITE"),
        pinned=None,
    )
    await eventually(lambda: env.rejected("mode_conflict") >= 1)
    (entry,) = env.registry.entries()  # whichever role listed first set the mode
    assert env.registry.mode == entry.instance.transfer_mode
    refused = "D" if entry.instance.role == "P" else "P"

    # The conflict ends when the pod in force goes: the refused one is retried.
    kept = "p0" if refused == "D" else "d0"
    await env.api.delete(kept)
    await eventually(lambda: len(env.addresses(refused)) == 1)


async def test_mode_conflict_with_a_pinned_mode(start: Start) -> None:
    env = await start(
        make_pod("p0", ip="10.0.0.1", mode="WRITE"),
        make_pod("d0", "decode", "10.0.0.2", mode="READ"),
        pinned="READ",
    )
    assert env.addresses("P") == [] and env.addresses("D") == ["10.0.0.2:20005"]
    assert env.rejected("mode_conflict") >= 1


async def test_stop_cancels_cleanly(start: Start) -> None:
    env = await start(make_pod("p0"), make_pod("d0", "decode", "10.0.0.2"))
    tasks = list(env.discovery._tasks)
    await env.discovery.stop()
    assert all(t.done() for t in tasks) and not env.discovery._tasks
    await eventually(lambda: env.api.active_watches == 0)
    await env.discovery.stop()  # idempotent
    assert len(env.registry.entries()) == 2  # as with Discovery: stopping clears nothing


async def test_kubeconfig_credentials_are_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = FakeKubeAPI()
    await api.put(make_pod("p0"))
    await api.start()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{api.url}"}}}}]
users: [{{name: proxy, user: {{token: s3cret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: proxy, namespace: moriio}}}}]
current-context: fake
"""
    )
    registry = Registry(10.0)
    discovery = KubernetesDiscovery(
        registry, Metrics(), namespace="moriio", kubeconfig=str(kubeconfig)
    )
    try:
        await discovery.start()
        await asyncio.wait_for(discovery.ready.wait(), STATE_TIMEOUT)
        assert api.authorization == "Bearer s3cret"
        assert [e.instance.http_address for e in registry.entries()] == ["10.0.0.1:20005"]
    finally:
        await discovery.stop()
        await api.close()


async def test_missing_credentials_fail_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    discovery = KubernetesDiscovery(
        Registry(10.0), Metrics(), namespace="x", kubeconfig=str(tmp_path / "missing")
    )
    with pytest.raises(KubernetesConfigError, match="cannot load Kubernetes API credentials"):
        await discovery.start()
    await discovery.stop()
