"""The pod rules of Kubernetes discovery: pure functions over the API server's JSON.

A pod must become exactly the instance its vLLM would announce, never route while it is
not Ready, and name the annotation that stops it when it cannot be described. None of
this needs kubernetes-asyncio or a socket.
"""

from __future__ import annotations

from typing import Any

import pytest

from moriio_proxy.discovery.kubernetes.pods import (
    ANNOTATIONS,
    PodRejected,
    as_mapping,
    pod_instance,
    pod_name,
    pod_version,
)
from moriio_proxy.protocol import Instance
from tests.harness.kube import make_pod


def test_pod_instance_builds_the_heartbeat_shape() -> None:
    pod = make_pod("p", ip="fd00::7", http=20005, handshake=6301, notify=6105, dp=8, mode="write")
    instance = pod_instance("P", pod)
    assert instance == Instance(
        role="P",
        http_address="fd00::7:20005",  # unbracketed, as vLLM announces itself
        kv_host="fd00::7",
        handshake_port=6301,
        notify_port=6105,
        dp_size=8,
        tp_size=1,
        transfer_mode="WRITE",
    )
    assert instance.base_url == "http://[fd00::7]:20005"


def test_annotation_values_are_trimmed_and_the_mode_uppercased() -> None:
    pod = make_pod("d", "decode", "10.0.0.2", http=" 65535 ", tp="4\n", mode=" read ")
    instance = pod_instance("D", pod)
    assert instance is not None
    assert (instance.role, instance.http_address) == ("D", "10.0.0.2:65535")
    assert (instance.tp_size, instance.transfer_mode) == (4, "READ")


@pytest.mark.parametrize(
    "pod",
    [
        make_pod("p", ready=False),
        make_pod("p", ip=None),
        make_pod("p", ip=""),
        make_pod("p", deleting=True),
        make_pod("p", ready=False, drop=("http-port",)),  # judged only once Ready
        {},
        {"metadata": "not an object", "status": ["not", "an", "object"]},
        {"status": {"podIP": "10.0.0.1", "conditions": {"type": "Ready", "status": "True"}}},
        {"status": {"podIP": 167772161, "conditions": [{"type": "Ready", "status": "True"}]}},
        {"status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": True}]}},
    ],
    ids=[
        "not-ready",
        "no-ip",
        "empty-ip",
        "terminating",
        "not-ready-and-unannotated",
        "empty",
        "wrong-shapes",
        "conditions-not-a-list",
        "ip-not-a-string",
        "ready-not-the-string-True",
    ],
)
def test_pod_instance_none_while_not_routable(pod: dict[str, Any]) -> None:
    assert pod_instance("P", pod) is None


@pytest.mark.parametrize(
    ("pod", "culprit"),
    [
        (make_pod("p", drop=("notify-port",)), "moriio.io/notify-port"),
        (make_pod("p", http="abc"), "moriio.io/http-port"),
        (make_pod("p", http=0), "moriio.io/http-port"),
        (make_pod("p", http=-1), "moriio.io/http-port"),
        (make_pod("p", handshake=70000), "moriio.io/handshake-port"),
        (make_pod("p", notify=65536), "moriio.io/notify-port"),
        (make_pod("p", dp=0), "moriio.io/dp-size"),
        (make_pod("p", dp="2.5"), "moriio.io/dp-size"),
        (make_pod("p", tp=""), "moriio.io/tp-size"),
        (make_pod("p", mode="FAST"), "moriio.io/transfer-mode"),
        (make_pod("p", ip="10.0.0.1/evil"), "status.podIP"),
    ],
)
def test_pod_instance_names_the_bad_annotation(pod: dict[str, Any], culprit: str) -> None:
    with pytest.raises(PodRejected) as info:
        pod_instance("P", pod)
    assert info.value.annotation == culprit


def test_every_missing_annotation_is_named_at_once() -> None:
    with pytest.raises(PodRejected) as info:
        pod_instance("P", make_pod("p", drop=("http-port", "dp-size")))
    assert info.value.annotation == "moriio.io/http-port, moriio.io/dp-size"
    assert info.value.detail == "missing"

    bare = make_pod("p")
    bare["metadata"]["annotations"] = "not an object"
    with pytest.raises(PodRejected) as info:
        pod_instance("P", bare)
    assert info.value.annotation == ", ".join(ANNOTATIONS)


def test_the_refusal_quotes_the_bad_value() -> None:
    with pytest.raises(PodRejected) as info:
        pod_instance("P", make_pod("p", dp="many"))
    assert "'many'" in info.value.detail and ">= 1" in info.value.detail
    assert str(info.value) == f"moriio.io/dp-size: {info.value.detail}"


@pytest.mark.parametrize(
    ("metadata", "name", "version"),
    [
        ({"name": "p0", "resourceVersion": "42"}, "p0", "42"),
        ({"name": "", "resourceVersion": ""}, None, None),
        ({"name": 7, "resourceVersion": 42}, None, None),
        ({}, None, None),
        ("not an object", None, None),
    ],
)
def test_name_and_version_only_as_non_empty_strings(
    metadata: Any, name: str | None, version: str | None
) -> None:
    pod = {"metadata": metadata}
    assert pod_name(pod) == name
    assert pod_version(pod) == version


def test_as_mapping_keeps_objects_and_empties_the_rest() -> None:
    obj = {"a": 1}
    assert as_mapping(obj) is obj
    assert as_mapping(None) == {} and as_mapping([("a", 1)]) == {} and as_mapping("a") == {}
