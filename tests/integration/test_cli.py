"""The command line as a user meets it: real processes, real signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import eventually, free_port
from tests.harness.serve import START_TIMEOUT, STOP_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moriio_proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


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
        timeout=60,
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
        timeout=60,
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


@contextlib.asynccontextmanager
async def demo() -> AsyncIterator[tuple[str, list[str]]]:
    """``moriio-proxy demo`` up to its banner: its URL and the banner's lines.

    The demo takes its ports as given (its simulated instances need the discovery port
    before the proxy runs), so they are chosen here, and a start that finds one taken in
    the meantime is retried on others.
    """
    for _attempt in range(5):
        port = free_port(random.randrange(20000, 30000))
        discovery = free_port(port + 1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moriio_proxy", "demo",
            "--port", str(port), "--discovery-port", str(discovery),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        banner: list[str] = []
        try:
            while not banner or "curl" not in banner[-1]:
                line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
                if not line:
                    break
                banner.append(line.decode())
            else:
                yield f"http://127.0.0.1:{port}", banner
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), STOP_TIMEOUT) == 0
                return
            error = (await proc.stderr.read()).decode()
            assert await proc.wait() == 1 and "Address already in use" in error, error
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    raise AssertionError("the demo found its ports taken five times in a row")


async def test_demo_serves_a_completion_and_stops_cleanly_on_sigterm(
    http: aiohttp.ClientSession,
) -> None:
    """The README's first command: the demo comes up, its curl line works, SIGTERM is 0."""
    async with demo() as (base, banner):
        assert any(base in line for line in banner)

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/ready") as resp:
                    return resp.status == 200
            return False

        await eventually(ready, interval=0.1, what="the demo ready")
        body = {"model": "sim-model", "prompt": "The capital of France is", "max_tokens": 8}
        async with http.post(base + "/v1/completions", json=body) as resp:
            answer = await resp.json()
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"]
