"""The command line as a user meets it: real processes, real signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moriio_proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "--port", "abc"], "--port"),
        (["serve", "--instance-ttl", "-1"], "--instance-ttl"),
        (["serve", "--prefill-policy", "fastest"], "--prefill-policy"),
        (["serve", "--config", "/nonexistent/moriio.yaml"], "--config"),
        (["sim", "--role", "X"], "--role"),
        (["sim", "--role", "P", "--block-size", "0"], "block_size"),
        (["sim", "--role", "P", "--prefill-token-latency", "-1"], "prefill_token_latency"),
        (["serve", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str], needle: str):
    result = run(*args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_env_values_are_checked_and_named():
    env = {**os.environ, "MORIIO_PROXY_PORT": "nope"}
    result = subprocess.run(
        [sys.executable, "-m", "moriio_proxy", "serve"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "MORIIO_PROXY_PORT" in result.stderr


def test_kubernetes_discovery_without_the_extra_exits_2_with_one_line():
    # As if kubernetes-asyncio were not installed (the k8s extra is optional).
    code = (
        "import sys; sys.modules['kubernetes_asyncio'] = None\n"
        "from moriio_proxy.cli import main\n"
        "sys.exit(main(['serve', '--discovery', 'kubernetes', '--port', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moriio-proxy: error: --discovery: Kubernetes discovery needs the kubernetes-asyncio "
        "package: pip install 'moriio-proxy[k8s]'"
    ]


def test_taken_port_exits_1_with_a_clear_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_serves_a_completion_and_stops_cleanly_on_sigterm():
    """The README's first command: the demo comes up, its curl line works, SIGTERM is 0."""
    port = free_port(21000 + os.getpid() % 5000)
    discovery = free_port(port + 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moriio_proxy",
            "demo",
            "--port",
            str(port),
            "--discovery-port",
            str(discovery),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        banner = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            banner.append(line)
            if "curl" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in banner)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if http_json(base + "/ready")["status"] == "ready":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        answer = http_json(
            base + "/v1/completions",
            {"model": "sim-model", "prompt": "The capital of France is", "max_tokens": 8},
        )
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
