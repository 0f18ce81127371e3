"""Proxy overhead against simulated instances, beside vllm-router's MoRI-IO mode.

Each target (moriio-proxy, and vllm-router when its binary is found) runs in its own
process with one simulated P and one simulated D (``moriio-proxy sim``) heartbeating to
it; this process drives a bounded streaming load and checks every answer against the
simulator's expected text. Results go to ``bench/results/overhead.{json,md}``.

    .venv/bin/python bench/bench_overhead.py [--requests 2000] [--concurrency 64]
        [--vllm-router PATH]   # default: vllm-router on PATH, skipped if absent
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moriio_proxy.sim import expected_text  # noqa: E402
from tests.harness import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(url: str, timeout: float = 30) -> None:
    body = {"model": "sim-model", "prompt": "warm up", "max_tokens": 1}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} never served a completion")


async def drive(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = wrong = leaks = 0
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, wrong, leaks
        for i in queue:
            prompt = f"benchmark prompt number {i} about disaggregated serving"
            body = {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens}
            body["stream"] = True
            started = time.perf_counter()
            first = None
            text = []
            try:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        errors += 1
                        await resp.read()
                        continue
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data:") or line == b"data: [DONE]":
                            continue
                        if first is None:
                            first = time.perf_counter() - started
                        if b"___prefill_addr_" in line:
                            leaks += 1
                        chunk = json.loads(line[5:])
                        text.extend(c.get("text", "") for c in chunk.get("choices", []))
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            ttfts.append(first or 0.0)
            if "".join(text) != expected_text(prompt, max_tokens):
                wrong += 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "requests": requests,
        "ok": len(latencies),
        "errors": errors,
        "wrong_text": wrong,
        "responses_leaking_internal_id": leaks,
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(latencies) / wall, 1),
        "latency_ms": {
            "p50": round(pct(latencies, 0.5), 2),
            "p90": round(pct(latencies, 0.9), 2),
            "p99": round(pct(latencies, 0.99), 2),
            "mean": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        },
        "ttft_ms": {"p50": round(pct(ttfts, 0.5), 2), "p99": round(pct(ttfts, 0.99), 2)},
    }


async def run_target(name: str, mode: str, args: argparse.Namespace, logs: Path) -> dict:
    http_port = free_port(21000)
    discovery_port = free_port(http_port + 1)
    python = sys.executable
    if name == "moriio-proxy":
        target = [
            python, "-m", "moriio_proxy", "serve", "--host", "127.0.0.1",
            "--port", str(http_port), "--discovery-host", "127.0.0.1",
            "--discovery-port", str(discovery_port), "--log-level", "warning",
        ]  # fmt: skip
    else:
        target = [
            args.vllm_router, "--vllm-pd-disaggregation", "--kv-connector", "moriio",
            "--vllm-discovery-address", f"127.0.0.1:{discovery_port}",
            "--host", "127.0.0.1", "--port", str(http_port), "--log-level", "warning",
            "--prometheus-port", str(free_port(discovery_port + 1)),
        ]  # fmt: skip
    procs = [spawn(target, logs / f"{name}-{mode}.log")]
    try:
        await asyncio.sleep(1.0)  # bind discovery before the simulators knock
        for role in ("P", "D"):
            sim = [
                python, "-m", "moriio_proxy", "sim", "--role", role, "--mode", mode,
                "--proxy", f"127.0.0.1:{discovery_port}", "--heartbeat-interval", "1",
            ]  # fmt: skip
            procs.append(spawn(sim, logs / f"{name}-{mode}-sim-{role}.log"))
        url = f"http://127.0.0.1:{http_port}"
        await wait_ready(url)
        result = await drive(url, args.requests, args.concurrency, args.max_tokens)
    finally:
        for proc in procs:
            stop(proc)
    return {"target": name, "mode": mode, **result}


def markdown(report: dict) -> str:
    lines = [
        "# Proxy overhead with simulated instances",
        "",
        f"{report['when']} on {report['machine']}; {report['settings']}.",
        "Each row: the target and one simulated P and D (zero simulated latency) in",
        "separate processes on the same machine; streaming completions checked token for",
        "token against the simulator's expected text.",
        "",
        "| target | mode | ok | errors | wrong text | id leaks | req/s | p50 ms | p99 ms "
        "| TTFT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lat, ttft = r["latency_ms"], r["ttft_ms"]
        lines.append(
            f"| {r['target']} | {r['mode']} | {r['ok']} | {r['errors']} | {r['wrong_text']} "
            f"| {r['responses_leaking_internal_id']} | {r['requests_per_second']} "
            f"| {lat['p50']} | {lat['p99']} | {ttft['p50']} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"))
    parser.add_argument("--modes", default="READ,WRITE")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    targets = ["moriio-proxy"] + (["vllm-router"] if args.vllm_router else [])
    results = []
    for mode in args.modes.split(","):
        for name in targets:
            print(f"running {name} {mode} ...", flush=True)
            results.append(await run_target(name, mode, args, logs))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "settings": f"{args.requests} requests, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, streaming",
        "command": "python bench/bench_overhead.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "overhead.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    asyncio.run(main())
