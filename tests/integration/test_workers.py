"""``serve --workers N``: one port, N processes, one discovery listener, one set of numbers.

The proxy runs as a real command (the supervisor spawns real worker processes); the
instances are simulators in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from moriio_proxy.compat import timeout_after
from moriio_proxy.sim import SimConfig, SimInstance, expected_text
from tests.harness import read_sse

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(
    rb"serving OpenAI on http://127\.0\.0\.1:(\d+) with (\d+) workers "
    rb"\(discovery: tcp://127\.0\.0\.1:(\d+)\)"
)


@dataclass
class Fleet:
    proc: asyncio.subprocess.Process
    url: str
    discovery: str
    log: list[bytes] = field(default_factory=list)
    sims: list[SimInstance] = field(default_factory=list)

    def workers(self) -> list[int]:
        """The supervisor's worker processes (multiprocessing's spawn children)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        pids = []
        for pid in children.split():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
        return pids


async def _pump(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while line := await stream.readline():
        sink.append(line)


@contextlib.asynccontextmanager
async def fleet(workers: int = 2, *extra: str) -> AsyncIterator[Fleet]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moriio_proxy", "serve", "--workers", str(workers),
        "--host", "127.0.0.1", "--port", "0", "--discovery-host", "127.0.0.1",
        "--discovery-port", "0", "--instance-ttl", "3", *extra,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[bytes] = []
    pump: asyncio.Task[None] | None = None
    sims: list[SimInstance] = []
    try:
        async with timeout_after(60):
            while True:
                line = await proc.stderr.readline()
                assert line, b"".join(log).decode()
                log.append(line)
                if match := SERVING.search(line):
                    break
        pump = asyncio.ensure_future(_pump(proc.stderr, log))
        port, count, discovery = match.groups()
        assert int(count) == workers
        url, address = f"http://127.0.0.1:{int(port)}", f"127.0.0.1:{int(discovery)}"
        yield Fleet(proc, url, address, log, sims)
    finally:
        for sim in sims:
            await sim.stop()
        if proc.returncode is None:
            proc.terminate()  # the supervisor stops its workers; killed, it could not
            try:
                async with timeout_after(30):
                    await proc.wait()
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if pump is not None:
            pump.cancel()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def eventually(predicate: Callable[[], bool], timeout: float) -> None:
    """Wait until ``predicate()`` holds (checked every 0.1 s), at most ``timeout`` s."""
    async with timeout_after(timeout):
        while not predicate():
            await asyncio.sleep(0.1)
            if predicate():
                return


async def add_sims(running: Fleet, **kwargs: object) -> None:
    for role in "PD":
        sim = SimInstance(
            SimConfig(role=role, proxy=running.discovery, heartbeat_interval=0.2, **kwargs)  # type: ignore[arg-type]
        )
        await sim.start()
        running.sims.append(sim)


def fresh() -> aiohttp.ClientSession:
    """A session whose every request opens a new connection, so the kernel may hand it
    to any worker."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def get_json(url: str) -> tuple[int, dict]:
    async with fresh() as s, s.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_ready(running: Fleet) -> None:
    """Ready on every worker: several fresh connections in a row all say so."""
    async with timeout_after(30):
        streak = 0
        while streak < 8:
            status, _ = await get_json(running.url + "/ready")
            streak = streak + 1 if status == 200 else 0
            if status != 200:
                await asyncio.sleep(0.1)


async def complete(url: str, prompt: str, stream: bool = False) -> str:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 6, "stream": stream}
    async with fresh() as s, s.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return str((await resp.json())["choices"][0]["text"])
        events = await read_sse(resp)
        return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))


def counter(metrics: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def scrape(url: str) -> str:
    async with fresh() as s, s.get(url + "/metrics") as resp:
        return await resp.text()


async def test_workers_share_the_port_the_instances_and_the_metrics():
    async with fleet(2) as running:
        assert len(running.workers()) == 2
        await add_sims(running)
        await wait_ready(running)
        prompts = [f"worker test prompt {i}" for i in range(24)]
        texts = await asyncio.gather(*(complete(running.url, p, stream=i % 2 == 1)
                                       for i, p in enumerate(prompts)))  # fmt: skip
        assert texts == [expected_text(p, 6) for p in prompts]

        # Every scrape, whichever worker answers it, adds up every worker's count; the
        # instance gauge is the registry's, not the sum of the workers' mirrors.
        for _ in range(8):
            text = await scrape(running.url)
            assert (
                counter(text, 'moriio_proxy_requests_total{endpoint="completions",outcome="ok"}')
                == 24
            )
            assert counter(text, 'moriio_proxy_instances{role="P"}') == 1
            assert counter(text, 'moriio_proxy_instances{role="D"}') == 1
            assert counter(text, "moriio_proxy_registrations_total") >= 2  # the supervisor's

        # Whichever worker answers, the admin view holds the same instances.
        views = [await get_json(running.url + "/admin/instances") for _ in range(6)]
        addresses = {tuple(sorted(i["http_address"] for i in v["instances"])) for _, v in views}
        assert len(addresses) == 1


async def test_fleet_inflight_is_the_sum_over_workers():
    async with fleet(2) as running:
        await add_sims(running, token_latency=0.2)
        await wait_ready(running)
        started = [asyncio.ensure_future(complete(running.url, f"slow {i}", stream=True))
                   for i in range(6)]  # fmt: skip
        try:
            async with timeout_after(10):
                while True:  # reports reach the supervisor once a second, snapshots follow
                    _, view = await get_json(running.url + "/admin/instances")
                    decode = next(i for i in view["instances"] if i["role"] == "D")
                    if decode["inflight"] == 6:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await asyncio.gather(*started)


async def test_a_dead_worker_is_replaced():
    async with fleet(2) as running:
        await add_sims(running)
        await wait_ready(running)
        victim = running.workers()[0]
        os.kill(victim, signal.SIGKILL)
        async with timeout_after(30):
            while True:
                workers = running.workers()
                if len(workers) == 2 and victim not in workers:
                    break
                await asyncio.sleep(0.1)
        await wait_ready(running)
        assert await complete(running.url, "after a restart") == expected_text("after a restart", 6)
        assert any(b"restarting it" in line for line in running.log)


async def test_sigterm_drains_every_worker_and_exits_0():
    async with fleet(2, "--drain-timeout", "10") as running:
        await add_sims(running, token_latency=0.05)
        await wait_ready(running)
        body = {"model": "sim-model", "prompt": "drain me", "max_tokens": 30, "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(running.url + "/v1/completions", json=body) as resp,
        ):
            assert resp.status == 200
            await resp.content.readline()
            running.proc.send_signal(signal.SIGTERM)
            events = await read_sse(resp)
        assert events[-1] == "[DONE]"
        assert not any("error" in e for e in events if isinstance(e, dict))
        async with timeout_after(20):
            assert await running.proc.wait() == 0


async def test_workers_of_a_killed_supervisor_shut_down():
    async with fleet(2) as running:
        workers = running.workers()
        running.proc.kill()  # no chance to stop them itself
        await running.proc.wait()
        await eventually(lambda: not any(alive(pid) for pid in workers), timeout=20)
        assert any(b"the supervisor is gone" in line for line in running.log)
