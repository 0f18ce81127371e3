"""A rehearsal of the GPU runtime on any machine: the real launch path, simulated vLLM.

The GPU suite's process handling (start through the deploy scripts, readiness, the
printed-command check, requests, SIGKILL, restart, teardown of whole process groups) is
code that otherwise only runs on a booked cluster. Here a stand-in ``vllm`` executable
turns the ``vllm serve`` command the scripts build into ``moriio-proxy sim`` with the same
role, ports, proxy address, mode and DP/TP, so the whole path runs for real in seconds.
What it cannot rehearse is vLLM itself: metrics, KV transfer, model output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moriio_proxy.check import run_check
from tests.gpu.config import GpuSettings
from tests.gpu.plan import build_plan, port_layout, scenarios
from tests.gpu.runtime import PROMPTS, Deployment, DeploymentError

FAKE_VLLM = """\
#!{python}
# Stand-in for `vllm serve`: runs the proxy's simulator with what the deploy scripts passed.
import json, os, sys

args = sys.argv[1:]
assert args[0] == "serve", args


def flag(name, default=None):
    return args[args.index(name) + 1] if name in args else default


extra = json.loads(flag("--kv-transfer-config"))["kv_connector_extra_config"]
role = "P" if json.loads(flag("--kv-transfer-config"))["kv_role"] == "kv_producer" else "D"
os.execv(sys.executable, [
    sys.executable, "-m", "moriio_proxy", "sim", "--role", role,
    "--host", extra["host_ip"], "--port", flag("--port"),
    "--proxy", extra["proxy_ip"] + ":" + extra["proxy_ping_port"],
    "--mode", "READ" if extra.get("read_mode") == "true" else "WRITE",
    "--dp-size", flag("--data-parallel-size", "1"),
    "--tp-size", flag("--tensor-parallel-size", "1"),
    "--model", args[1],
    "--handshake-port", extra["handshake_port"], "--notify-port", extra["notify_port"],
    "--heartbeat-interval", "0.5",
])
"""


# Where a rehearsal's port blocks may start: each spans 602 ports from its base, below
# the ephemeral range (32768+) like every fixed port the tests pick (tests/harness/ports.py).
_BASES = range(20000, 31000, 700)


def free_base() -> int:
    """A port base whose every derived port (and MoRI-IO range) is free now.

    The search starts at a random block, so concurrent sessions rarely pick the same
    one; the ports are released before the deployment binds them, so a start that finds
    one taken meanwhile is retried (``rehearsal``).
    """
    start = random.randrange(len(_BASES))
    for base in (*_BASES[start:], *_BASES[:start]):
        ports = set(port_layout(base).values())
        ports |= {base + offset + i for offset in (100, 200, 300, 400, 500, 600) for i in range(2)}
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    pytest.skip("no free block of ports for the rehearsal")


@contextlib.contextmanager
def rehearsal(scenario: str, settings: GpuSettings, logs: Path) -> Iterator[Deployment]:
    """The scenario deployed on a free port block; a start that lost a port to another
    process in the meantime is retried on a new block (its logs removed)."""
    for _attempt in range(5):
        here = dataclasses.replace(settings, port_base=free_base())
        plan = build_plan(scenarios(here)[scenario], here)
        deployment = Deployment(plan, here, logs, poll=0.1)
        try:
            deployment.__enter__()
        except DeploymentError as exc:
            if "address already in use" not in str(exc).lower():
                raise
            shutil.rmtree(logs, ignore_errors=True)
            continue
        try:
            yield deployment
        finally:
            deployment.__exit__(None, None, None)
        return
    raise AssertionError("the rehearsal found its ports taken five times in a row")


@pytest.fixture
def settings(tmp_path: Path) -> GpuSettings:
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(0o755)
    env = {
        "MORIIO_GPU_MODEL": "sim/model",
        "MORIIO_GPU_HOST_IP": "127.0.0.1",
        "MORIIO_GPU_VLLM": str(fake),
        "MORIIO_GPU_PORT_BASE": str(free_base()),
        "MORIIO_GPU_REQUEST_TIMEOUT": "20",
        "MORIIO_GPU_STARTUP_TIMEOUT": "30",
        "MORIIO_GPU_MAX_TOKENS": "8",
    }
    return GpuSettings.from_env(env)


def group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_runtime_rehearsal_with_simulated_vllm(settings: GpuSettings, tmp_path: Path) -> None:
    """Two prefills and a decode through the scripts: serve, stream, check, crash, restart."""
    with rehearsal("prefill-failover", settings, tmp_path / "logs") as dep:
        plan = dep.plan
        answers = [dep.complete(prompt) for prompt in PROMPTS[:3]]
        assert [a.kind for a in answers] == ["ok"] * 3, [a.describe() for a in answers]
        assert all(a.text and a.prompt_tokens for a in answers)
        streamed = dep.complete(PROMPTS[0], stream=True)
        assert streamed.kind == "ok" and streamed.text == answers[0].text

        report = asyncio.run(run_check(dep.proxy_url, model=dep.model, timeout=5))
        assert report.exit_code == 0, report.to_text()
        admin = dep.admin()
        assert {i["http_address"] for i in admin["instances"]} == {
            launch.http_address for launch in plan.launches[1:]
        }

        victim = dep.processes["prefill"]
        assert victim.popen is not None
        victim_pid = victim.popen.pid
        victim.kill()
        assert not victim.alive and group_gone(victim_pid)
        crashed = asyncio.run(run_check(dep.proxy_url, model=dep.model, timeout=5))
        reach = crashed.by_name(f"reach P {victim.launch.http_address}")
        assert reach.status == "FAIL" and "connection refused" in reach.message
        assert dep.complete(PROMPTS[1]).kind == "ok"  # retried on the other prefill

        restarted = dep.restart("prefill")
        assert restarted.alive and restarted.log_path.name == "prefill.restart1.log"
        assert dep.complete(PROMPTS[2]).kind == "ok"
        processes = list(dep.processes.values())
    pids = [p.popen.pid for p in processes if p.popen is not None]
    assert len(pids) == 4
    assert all(not p.alive for p in processes)
    assert all(group_gone(pid) for pid in pids)
    logs = sorted(path.name for path in (tmp_path / "logs" / "prefill-failover").iterdir())
    assert logs == [
        "decode.log",
        "prefill-2.log",
        "prefill.log",
        "prefill.restart1.log",
        "proxy.log",
    ]


def test_an_instance_that_dies_at_startup_is_reported_with_its_log(
    settings: GpuSettings, tmp_path: Path
) -> None:
    """No waiting out the startup timeout: the exit is seen, and the log tail shown."""
    broken = tmp_path / "bin" / "vllm"
    broken.write_text("#!/bin/sh\necho 'RuntimeError: HIP out of memory' >&2\nexit 3\n")
    plan = build_plan(scenarios(settings)["read-1p1d"], settings)
    with pytest.raises(DeploymentError) as caught:
        Deployment(plan, settings, tmp_path / "logs", poll=0.1).__enter__()
    message = str(caught.value)
    assert "exited with status 3" in message
    assert "HIP out of memory" in message
