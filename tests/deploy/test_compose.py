"""deploy/compose: the 1P1D single-node compose file, parsed and interpolated as compose would.

There is no Docker engine here, so `docker compose config` cannot run: the file is read as
YAML, its ${VAR} references are resolved as compose resolves them, and what a real node
needs is asserted (host network, ROCm and RDMA devices, memlock, shm, the proxy first) along
with the kv-transfer-config each instance gets.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from moriio_proxy.config import load_config
from tests.deploy.util import DEPLOY, ROOT, assert_disjoint, kv_config

COMPOSE = DEPLOY / "compose" / "compose.yaml"
REQUIRED = {"MODEL": "org/model", "HOST_IP": "10.0.0.1"}
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, applied to every string."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise MissingVariable(f"{name}: {arg}")
        return ""

    return _VAR.sub(value, node)


def load(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    services = raw["services"]
    assert set(services) == {"proxy", "prefill", "decode"}
    return interpolate(raw, {**REQUIRED, **(env or {})})


def vllm_argv(service: dict[str, Any]) -> list[str]:
    assert service["entrypoint"] == ["vllm", "serve"]
    return [*service["entrypoint"], *(str(a) for a in service["command"])]


def test_instances_have_what_rocm_and_rdma_need() -> None:
    services = load()["services"]
    for name in ("prefill", "decode"):
        s = services[name]
        assert s["network_mode"] == "host"
        assert s["ipc"] == "host"
        assert s["shm_size"]
        assert {"/dev/kfd", "/dev/dri", "/dev/infiniband"} <= set(s["devices"])
        assert s["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
        assert "IPC_LOCK" in s["cap_add"]
        assert "video" in s["group_add"]
        # The proxy first: the port trap.
        assert s["depends_on"] == {"proxy": {"condition": "service_healthy"}}
        port = vllm_argv(s)[vllm_argv(s).index("--port") + 1]
        assert f"127.0.0.1:{port}/health" in " ".join(s["healthcheck"]["test"])
    assert services["proxy"]["network_mode"] == "host"


@pytest.mark.parametrize(("read_mode", "mode"), [(None, "READ"), ("false", "WRITE")])
def test_kv_transfer_configs_match_each_other_and_the_proxy(read_mode: str | None, mode: str):
    env = {"MORIIO_READ_MODE": read_mode} if read_mode else {}
    services = load(env)["services"]
    proxy = load_config(env={k: str(v) for k, v in services["proxy"]["environment"].items()})
    p, d = vllm_argv(services["prefill"]), vllm_argv(services["decode"])
    p_kv, d_kv = kv_config(p), kv_config(d)
    assert (p_kv["kv_role"], d_kv["kv_role"]) == ("kv_producer", "kv_consumer")
    p_x, d_x = p_kv["kv_connector_extra_config"], d_kv["kv_connector_extra_config"]
    for extra in (p_x, d_x):
        assert extra["proxy_ip"] == extra["host_ip"] == "10.0.0.1"
        assert extra["proxy_ping_port"] == str(proxy.discovery_port)
        # vLLM: READ for "true"/"1", WRITE for anything else.
        assert (extra["read_mode"].lower() in ("true", "1")) == (mode == "READ")
    assert p[2] == d[2] == "org/model"
    assert p[p.index("--block-size") + 1] == d[d.index("--block-size") + 1] == "16"
    # Registration only from this node.
    assert [str(n) for n in proxy.discovery_allow] == ["10.0.0.1/32", "127.0.0.0/8"]


@pytest.mark.parametrize("tp", ["1", "4", "8"])
def test_ports_on_the_one_host_never_overlap(tp: str) -> None:
    services = load({"PREFILL_TP": tp, "DECODE_TP": tp})["services"]
    proxy = load_config(env={k: str(v) for k, v in services["proxy"]["environment"].items()})
    ports = {"proxy-http": (proxy.port, 1), "proxy-discovery": (proxy.discovery_port, 1)}
    for name in ("prefill", "decode"):
        argv = vllm_argv(services[name])
        extra = kv_config(argv)["kv_connector_extra_config"]
        n = int(argv[argv.index("--tensor-parallel-size") + 1])
        assert n == int(tp)
        ports[f"{name}-http"] = (int(extra["http_port"]), 1)
        ports[f"{name}-handshake"] = (int(extra["handshake_port"]), n)
        ports[f"{name}-notify"] = (int(extra["notify_port"]), n)
    assert_disjoint(ports)


def test_default_gpus_are_disjoint_and_match_tp() -> None:
    services = load()["services"]
    seen: set[str] = set()
    for name in ("prefill", "decode"):
        gpus = services[name]["environment"]["HIP_VISIBLE_DEVICES"].split(",")
        argv = vllm_argv(services[name])
        assert len(gpus) == int(argv[argv.index("--tensor-parallel-size") + 1])
        assert not seen & set(gpus)
        seen |= set(gpus)


@pytest.mark.parametrize("missing", ["MODEL", "HOST_IP"])
def test_model_and_host_ip_are_required(missing: str) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        interpolate(raw, env)


def test_proxy_healthcheck_is_the_one_the_proxy_image_ships() -> None:
    proxy = load()["services"]["proxy"]
    assert proxy["entrypoint"] == ["moriio-proxy", "serve"]
    assert proxy["healthcheck"]["test"] == ["CMD", "python", "/opt/moriio-proxy/healthcheck.py"]
    dockerfile = (ROOT / "docker" / "Dockerfile.proxy").read_text()
    assert "docker/healthcheck.py /opt/moriio-proxy/healthcheck.py" in dockerfile
    # The image's check reads MORIIO_PROXY_PORT: the compose file sets the port there.
    assert proxy["environment"]["MORIIO_PROXY_PORT"] == "10001"


def test_example_env_names_every_variable_the_compose_file_reads() -> None:
    used = {name for name, _, _ in _VAR.findall(COMPOSE.read_text())}
    example = (DEPLOY / "compose" / "example.env").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_]+)=", example, flags=re.M))
    assert used <= documented, used - documented
