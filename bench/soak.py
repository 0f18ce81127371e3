"""Soak: a long, faulty, mixed workload through the proxy; nothing may hang or leak.

The proxy and two simulated P and two simulated D instances run as separate processes.
Faults are injected through the simulators' control ports: failing and stalled prefills,
decodes that die or stall mid-stream, a prefill that refuses connections for a while
(while still heartbeating); some clients hang up mid-stream. Every request is bounded on
the client side; one that outlives that bound counts as hung. File descriptors and RSS of
the proxy are read from /proc after a warm-up and at the end.

    .venv/bin/python bench/soak.py [--requests 20000] [--concurrency 64] [--mode READ]

Writes bench/results/soak-<mode>.{json,md}; exits 1 if a request hung or the proxy's
descriptors or memory grew by 10% or more.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.processes import SimProcess, start_proxy, start_sim  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROXY_SETTINGS = {
    "--prefill-timeout": "2",
    "--decode-first-byte-timeout": "3",
    "--stream-idle-timeout": "1",
    "--request-timeout": "10",
    "--eject-after": "3",
    "--eject-seconds": "2",
    "--max-retries": "2",
    "--instance-ttl": "5",
    # info: the level at which the proxy logs the ports it bound (it logs nothing per
    # request there; the faults' warnings are logged at any level above error).
    "--log-level": "info",
}
WARMUP = int(os.environ.get("SOAK_WARMUP", "5000"))  # requests before the first measurement
SETTLE = 6.0  # seconds at rest before measuring: past Hypercorn's 5 s keep-alive
CLIENT_BOUND = 20.0  # seconds: twice the request deadline; past it a request "hung"

# Per-instance faults (PATCH /sim/faults); one shared seed so runs repeat.
FAULTS = {
    "P1": {"status": 500, "probability": 0.03},
    "P2": {"stall_first_byte": 30.0, "probability": 0.005},
    "D1": {"die_after_tokens": 3, "probability": 0.02},
    "D2": {"stall_after_tokens": [2, 30.0], "probability": 0.005},
}


def proc_usage(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return {"open_fds": fds, "rss_kb": rss_kb}


async def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/admin/instances") as resp:
                    listed = (await resp.json())["instances"]
                    if len(listed) == 4:
                        return
            await asyncio.sleep(0.3)
    raise RuntimeError("the simulated instances never registered")


async def one_request(session: aiohttp.ClientSession, url: str, i: int, rng: random.Random) -> str:
    """Send one request; return its outcome label."""
    chat = rng.random() < 0.3
    streaming = rng.random() < 0.7
    hang_up = streaming and rng.random() < 0.02
    prompt = f"soak request {i} " + "word " * rng.randint(1, 40)
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": rng.randint(1, 24)}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if streaming:
        body["stream"] = True
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return f"http_{resp.status}"
        if not streaming:
            payload = await resp.json()
            return "ok" if payload.get("choices") else "bad_body"
        outcome = "stream_without_done"
        async for raw in resp.content:
            line = raw.strip()
            if hang_up and line.startswith(b"data:"):
                return "client_hung_up"
            if line == b"data: [DONE]":
                return outcome if outcome != "stream_without_done" else "ok"
            if line.startswith(b'data: {"error"'):
                code = json.loads(line[6:])["error"].get("code")
                outcome = f"sse_error_{code}"
        return outcome


async def toggle_refusal(control: str, stop: asyncio.Event) -> None:
    """Every 10 s, make P2 refuse connections for 2 s while it keeps heartbeating."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 8)
            if stop.is_set():
                break
            for refuse in (True, False):
                with contextlib.suppress(aiohttp.ClientError):
                    await session.patch(
                        control + "/sim/faults", json={"refuse_connections": refuse}
                    )
                if refuse:
                    await asyncio.sleep(2)


async def drive(url: str, total: int, concurrency: int, seed: int) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker(wid: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(seed * 1000 + wid)
        for i in counter:
            started = time.monotonic()
            try:
                label = await asyncio.wait_for(one_request(session, url, i, rng), CLIENT_BOUND)
            except asyncio.TimeoutError:
                label = "hung"
            except aiohttp.ClientError as exc:
                label = f"transport_{type(exc).__name__}"
            outcomes[label] += 1
            latencies.append(time.monotonic() - started)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
        wall = time.monotonic() - started
    latencies.sort()
    return {
        "outcomes": dict(outcomes.most_common()),
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(total / wall, 1),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "latency_max_ms": round(latencies[-1] * 1000, 1),
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    for part in parts:
        outcomes.update(part["outcomes"])
    wall = sum(p["wall_seconds"] for p in parts)
    total = sum(outcomes.values())
    return {
        "outcomes": dict(outcomes.most_common()),
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(total / wall, 1),
        "latency_p50_ms": sorted(p["latency_p50_ms"] for p in parts)[len(parts) // 2],
        "latency_max_ms": max(p["latency_max_ms"] for p in parts),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--mode", choices=("READ", "WRITE"), default="READ")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)

    proxy_args: list[str] = []
    for flag, value in PROXY_SETTINGS.items():
        proxy_args += [flag, value]
    # Every process binds its own ports (0) and says which: no port is picked here.
    proxy = start_proxy(logs / f"soak-{args.mode}-proxy.log", proxy_args)
    procs = [proxy.proc]
    proxy_pid = proxy.proc.pid
    sims: dict[str, SimProcess] = {}
    try:
        for name in FAULTS:
            extra = ["--control-port", "0", "--seed", str(args.seed)]
            log = logs / f"soak-{args.mode}-{name}.log"
            sims[name] = start_sim(name[0], args.mode, log, proxy.discovery, extra)
            procs.append(sims[name].proc)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    controls = {name: sim.control_url or sim.url for name, sim in sims.items()}
    stop = asyncio.Event()
    usage: dict[str, Any] = {}
    try:
        url = proxy.url
        await wait_ready(url)
        async with aiohttp.ClientSession() as session:
            for name, faults in FAULTS.items():
                async with session.patch(controls[name] + "/sim/faults", json=faults) as resp:
                    resp.raise_for_status()
        toggler = asyncio.create_task(toggle_refusal(controls["P2"], stop))
        # Warm up (pools, caches, allocator arenas), then measure at rest before and after
        # the real run, so growth means a leak and not the load itself.
        await drive(url, WARMUP, args.concurrency, args.seed + 1)
        await asyncio.sleep(SETTLE)
        usage["after_warmup"] = proc_usage(proxy_pid)
        # The run in four parts, measured at rest after each: growth that levels off is
        # the allocator settling, growth that keeps climbing is a leak.
        parts, series = [], [usage["after_warmup"]["rss_kb"]]
        size = -(-args.requests // 4)
        for part, first in enumerate(range(0, args.requests, size)):
            count = min(size, args.requests - first)
            parts.append(await drive(url, count, args.concurrency, args.seed + 10 + part))
            await asyncio.sleep(SETTLE)
            series.append(proc_usage(proxy_pid)["rss_kb"])
        result = merge(parts)
        result["rss_kb_at_rest_by_quarter"] = series
        stop.set()
        await toggler
        usage["end"] = proc_usage(proxy_pid)
        async with aiohttp.ClientSession() as session:
            sim_stats = {}
            for name, control in controls.items():
                async with session.get(control + "/sim/stats") as resp:
                    stats = await resp.json()
                sim_stats[name] = {
                    k: stats.get(k)
                    for k in ("requests", "completed", "cancelled", "faults_applied",
                              "garbage_outputs", "dead_reason", "held_transfers",
                              "pending_kv_waiters", "kv_wait_cancelled")
                }  # fmt: skip
            async with session.get(url + "/metrics") as resp:
                metrics_text = await resp.text()
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    start, end = usage["after_warmup"], usage["end"]
    growth = {k: round((end[k] - start[k]) / start[k] * 100, 1) if start[k] else 0.0 for k in start}
    hung = result["outcomes"].get("hung", 0)
    interesting = (
        "moriio_proxy_retries_total",
        "moriio_proxy_ejections_total",
        "moriio_proxy_decode_aborted_before_kv_total",
        "moriio_proxy_kv_release_legs_total",
        "moriio_proxy_upstream_errors_total",
    )
    proxy_metrics = [line for line in metrics_text.splitlines() if line.startswith(interesting)]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "mode": args.mode,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "proxy_settings": PROXY_SETTINGS,
        "faults": FAULTS | {"P2 (periodic)": "refuse_connections 2 s of every 10 s"},
        "client_bound_seconds": CLIENT_BOUND,
        "hung": hung,
        **result,
        "proxy_usage": usage,
        "growth_percent": growth,
        "simulated_instances": sim_stats,
        "proxy_metrics": proxy_metrics,
        "verdict": "pass" if hung == 0 and all(g < 10 for g in growth.values()) else "fail",
    }
    name = f"soak-{args.mode.lower()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Soak ({args.mode} mode): {report['verdict']}",
        "",
        f"{report['when']} on {report['machine']}. `{report['command']}`",
        "",
        f"- requests: {args.requests} at concurrency {args.concurrency}, "
        f"{result['wall_seconds']} s ({result['requests_per_second']} req/s)",
        f"- hung (no answer within {CLIENT_BOUND:g} s): **{hung}**",
        f"- outcomes: {json.dumps(result['outcomes'])}",
        f"- proxy at rest after {WARMUP} warm-up requests: {start['open_fds']} fds, "
        f"{start['rss_kb']} kB RSS; "
        f"at the end: {end['open_fds']} fds, {end['rss_kb']} kB RSS "
        f"(growth {growth['open_fds']}% / {growth['rss_kb']}%)",
        f"- RSS at rest after warm-up and after each quarter (kB): "
        f"{result['rss_kb_at_rest_by_quarter']}",
        f"- latency p50 {result['latency_p50_ms']} ms (median of the quarters), "
        f"max {result['latency_max_ms']} ms",
        "",
        "Proxy counters:",
        "",
        *(f"    {line}" for line in proxy_metrics),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
