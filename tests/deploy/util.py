"""Helpers shared by the deploy/ tests: paths, command-line parsing, port ranges."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from moriio_proxy.cli import build_parser
from moriio_proxy.config import OPTIONS, ProxyConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS = DEPLOY / "scripts"
KUBERNETES = DEPLOY / "kubernetes"

# The keys kv_connector_extra_config may carry in vLLM 0.32 (MoRIIOConfig.from_vllm_config).
VLLM_EXTRA_CONFIG_KEYS = {
    "proxy_ip",
    "proxy_ping_port",
    "http_port",
    "handshake_port",
    "notify_port",
    "read_mode",
    "backend",
    "host_ip",
    "transfer_timeout",
    "defer_timeout",
    "recv_abort_timeout",
    "qp_per_transfer",
    "post_batch_size",
    "num_workers",
}


def command_line(stdout: str) -> list[str]:
    """The one shell-quoted command line a --dry-run prints, as an argv."""
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one command line, got {stdout!r}"
    return shlex.split(lines[0])


def flag(argv: list[str], name: str) -> str:
    """The value after a flag; the flag must appear exactly once."""
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def kv_config(argv: list[str]) -> dict:
    """The parsed --kv-transfer-config of a `vllm serve` argv, checked for vLLM's rules."""
    config = json.loads(flag(argv, "--kv-transfer-config"))
    assert config["kv_connector"] == "MoRIIOConnector"
    assert config["kv_role"] in ("kv_producer", "kv_consumer")
    extra = config["kv_connector_extra_config"]
    assert set(extra) <= VLLM_EXTRA_CONFIG_KEYS, set(extra) - VLLM_EXTRA_CONFIG_KEYS
    assert extra["http_port"] == flag(argv, "--port"), "http_port must equal --port"
    assert extra["backend"] in ("rdma", "xgmi")
    return config


def serve_config(args: list[str]) -> ProxyConfig:
    """What `moriio-proxy serve ARGS` would run with, through the real parser."""
    parsed = build_parser().parse_args(["serve", *args])
    return load_config({o.name: getattr(parsed, o.name) for o in OPTIONS}, env={})


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Do the port ranges (start, count) share a port?"""
    return a[0] <= b[0] + b[1] - 1 and b[0] <= a[0] + a[1] - 1


def assert_disjoint(ports: dict[str, tuple[int, int]]) -> None:
    names = sorted(ports)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not ranges_overlap(ports[x], ports[y]), f"{x} {ports[x]} overlaps {y} {ports[y]}"
