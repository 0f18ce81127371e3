"""SIGHUP reads the client keys file again in a real ``moriio-proxy serve``, with one
process and with workers (the supervisor passes the signal on), while requests are in
flight: none of them fails, the new key works everywhere, the old one nowhere."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from moriio_proxy.sim import expected_text
from tests.harness import eventually, read_sse
from tests.harness.serve import ServeProcess, serve_process

PROMPT = "The quick brown fox jumps over the lazy dog"
TOKENS = 30


def fresh() -> aiohttp.ClientSession:
    """Every request on a new connection, so the kernel may hand it to any worker."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def status_with(url: str, key: str) -> int:
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    async with fresh() as s, s.post(url + "/v1/completions", json=body, headers=headers) as r:
        await r.read()
        return r.status


async def everywhere(running: ServeProcess, key: str, status: int, times: int) -> bool:
    """``times`` fresh connections in a row all answered ``status``."""
    for _ in range(times):
        if await status_with(running.url, key) != status:
            return False
    return True


async def stream(url: str, key: str, started: asyncio.Event) -> str:
    """A long streamed completion; ``started`` is set once its head arrived."""
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": TOKENS, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with fresh() as s, s.post(url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        started.set()
        events = await read_sse(r)
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_swaps_the_keys_without_failing_a_request(tmp_path: Path, workers: int):
    keys = tmp_path / "keys"
    keys.write_text("sk-old\n", encoding="utf-8")
    async with serve_process(
        "--workers", str(workers), "--instance-ttl", "3", "--api-key-file", str(keys)
    ) as running:
        for role in "PD":
            await running.add_sim(role, token_latency=0.03)
        await running.wait_ready(times=2 * workers)
        times = 4 * workers  # enough fresh connections to meet every worker
        assert await everywhere(running, "sk-old", 200, times)
        assert await everywhere(running, "sk-new", 401, times)

        starts = [asyncio.Event() for _ in range(6)]
        flights = [asyncio.ensure_future(stream(running.url, "sk-old", e)) for e in starts]
        await asyncio.gather(*(e.wait() for e in starts))  # every one is under way

        keys.write_text("# rotated\nsk-new\n", encoding="utf-8")
        os.kill(running.proc.pid, signal.SIGHUP)
        await eventually(
            lambda: everywhere(running, "sk-new", 200, times), what="the new key everywhere"
        )
        assert await everywhere(running, "sk-old", 401, times)
        texts = await asyncio.gather(*flights)
        assert texts == [expected_text(PROMPT, TOKENS)] * len(flights)
        await eventually(
            lambda: running.log_text().count("reloaded the client API keys: 1 in force") == workers,
            what="every process reporting its reload",
        )

        # a file that cannot be read keeps the keys in force, and the process runs on
        keys.unlink()
        os.kill(running.proc.pid, signal.SIGHUP)
        await eventually(
            lambda: running.log_text().count("keeping the 1 keys in force") == workers,
            what="every process keeping its keys",
        )
        assert await everywhere(running, "sk-new", 200, times)
        assert "sk-new" not in running.log_text() and "sk-old" not in running.log_text()
