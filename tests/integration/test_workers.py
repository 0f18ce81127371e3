"""``serve --workers N``: one port, N processes, one discovery listener, one set of numbers.

The proxy runs as a real command (the supervisor spawns real worker processes); the
instances are simulators in this process. SIGTERM's drain, with one process or several, is
tested in test_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from moriio_proxy.sim import SimFaults, expected_text
from tests.harness import eventually, read_sse
from tests.harness.proxy import start_sim
from tests.harness.serve import ServeProcess, serve_process


def workers(running: ServeProcess) -> list[int]:
    """The supervisor's worker processes (multiprocessing's spawn children)."""
    pid = running.proc.pid
    pids = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(int(child))
    return pids


def fleet(n: int = 2, *extra: str) -> contextlib.AbstractAsyncContextManager[ServeProcess]:
    return serve_process("--workers", str(n), "--instance-ttl", "3", *extra)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def add_sims(running: ServeProcess, **settings: object) -> None:
    for role in "PD":
        await running.add_sim(role, **settings)


def fresh() -> aiohttp.ClientSession:
    """A session whose every request opens a new connection, so the kernel may hand it
    to any worker."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def get_json(url: str) -> tuple[int, dict]:
    async with fresh() as s, s.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


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
        assert running.serving.workers == 2 and len(workers(running)) == 2
        await add_sims(running)
        await running.wait_ready(times=8)
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
        await running.wait_ready(times=8)
        started = [asyncio.ensure_future(complete(running.url, f"slow {i}", stream=True))
                   for i in range(6)]  # fmt: skip

        async def six_on_the_decode() -> bool:
            _, view = await get_json(running.url + "/admin/instances")
            decode = next(i for i in view["instances"] if i["role"] == "D")
            return bool(decode["inflight"] == 6)

        try:  # reports reach the supervisor once a second, snapshots follow
            await eventually(six_on_the_decode, interval=0.1, what="the fleet's inflight")
        finally:
            await asyncio.gather(*started)


async def test_a_dead_worker_is_replaced():
    async with fleet(2) as running:
        await add_sims(running)
        await running.wait_ready(times=8)
        victim = workers(running)[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = workers(running)
            return len(now) == 2 and victim not in now

        await eventually(replaced, interval=0.1, what="a new worker")
        await running.wait_ready(times=8)
        assert await complete(running.url, "after a restart") == expected_text("after a restart", 6)
        await eventually(lambda: "restarting it" in running.log_text())


async def test_workers_of_a_killed_supervisor_shut_down():
    async with fleet(2) as running:
        pids = workers(running)
        running.proc.kill()  # no chance to stop them itself
        await running.proc.wait()
        await eventually(lambda: not any(alive(pid) for pid in pids), what="workers gone")
        await eventually(lambda: "the supervisor is gone" in running.log_text())


async def test_workers_pair_with_the_versions_the_supervisor_learned():
    """A mixed-TP WRITE fleet is served only when the workers know both sides run vLLM 0.33
    (unknown counts as 0.32), so correct answers prove the snapshots carried the versions."""
    async with fleet(2) as running:
        for role, tp in (("P", 2), ("D", 4)):
            await running.add_sim(role, mode="WRITE", tp_size=tp)

        async def every_worker_knows() -> bool:
            # Fresh connections: whichever worker answers must know both versions.
            for _ in range(8):
                _, view = await get_json(running.url + "/admin/instances")
                instances = view["instances"]
                if len(instances) != 2 or {i["vllm_version"] for i in instances} != {"0.33.0"}:
                    return False
                if any(i["unpaired"] is not None for i in instances):
                    return False
            return True

        await eventually(every_worker_knows, interval=0.1, what="versions in every worker")
        prompts = [f"mixed tp prompt {i}" for i in range(8)]
        texts = await asyncio.gather(*(complete(running.url, p) for p in prompts))
        assert texts == [expected_text(p, 6) for p in prompts]


async def post_json(url: str, body: dict) -> tuple[int, dict]:
    async with fresh() as s, s.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def states_everywhere(url: str, times: int = 8) -> set[tuple[tuple[str, str], ...]]:
    """What ``times`` fresh connections (any worker) list, as (address, state) pairs."""
    seen = set()
    for _ in range(times):
        _, view = await get_json(url + "/admin/instances")
        seen.add(tuple(sorted((i["http_address"], i["state"]) for i in view["instances"])))
    return seen


async def test_admin_actions_reach_the_supervisor_and_every_worker():
    """A drain received by one worker is applied by the supervisor and, through its
    snapshot, by every worker before the answer: no worker routes to the drained decode."""
    async with fleet(2, "--admin-allow-localhost") as running:  # no --admin-token
        await running.add_sim("P")
        d1 = await running.add_sim("D")
        d2 = await running.add_sim("D")
        await running.wait_ready(times=8)

        def decodes(sim) -> int:
            return sum(1 for leg in sim.legs if leg.kind == "decode")

        target = {"role": "D", "http_address": d1.http_address}
        status, answer = await post_json(running.url + "/admin/instances/drain", target)
        assert (status, answer["instance"]["state"]) == (200, "draining")
        # The worker that answered has applied the acknowledging snapshot; the other one
        # received the same snapshot at the same moment.
        expected = {(d1.http_address, "draining"), (d2.http_address, "healthy")}

        async def everywhere(wanted: set[tuple[str, str]]) -> bool:
            return all(wanted <= set(seen) for seen in await states_everywhere(running.url))

        await eventually(lambda: everywhere(expected), what="the drain in every worker")
        before = decodes(d1), decodes(d2)
        prompts = [f"while drained {i}" for i in range(12)]
        texts = await asyncio.gather(*(complete(running.url, p) for p in prompts))
        assert texts == [expected_text(p, 6) for p in prompts]
        assert decodes(d1) == before[0] and decodes(d2) == before[1] + 12

        status, answer = await post_json(running.url + "/admin/instances/undrain", target)
        assert (status, answer["instance"]["state"]) == (200, "healthy")
        await eventually(
            lambda: everywhere({(d1.http_address, "healthy")}), what="the undrain everywhere"
        )

        # A refusal is the supervisor's too, in vLLM's shape, whichever worker asked.
        status, answer = await post_json(
            running.url + "/admin/instances/drain", {"role": "P", "http_address": "10.9.9.9:1"}
        )
        assert status == 404
        assert answer["error"]["message"] == "no P instance 10.9.9.9:1 is registered"


async def test_a_static_instance_added_through_a_worker_serves_from_every_worker():
    async with fleet(2, "--admin-allow-localhost") as running:  # no --admin-token
        await running.add_sim("P")
        decode = await start_sim("D", None)  # no heartbeats: only the API can add it
        try:
            status, answer = await post_json(
                running.url + "/admin/instances/add", decode.registration()
            )
            assert status == 201 and answer["instance"]["static"] is True
            await running.wait_ready(times=8)
            prompts = [f"static decode {i}" for i in range(8)]
            texts = await asyncio.gather(*(complete(running.url, p) for p in prompts))
            assert texts == [expected_text(p, 6) for p in prompts]

            status, _ = await post_json(
                running.url + "/admin/instances/remove",
                {"role": "D", "http_address": decode.http_address},
            )
            assert status == 200

            async def gone_everywhere() -> bool:
                listings = await states_everywhere(running.url)
                return all(decode.http_address not in dict(seen) for seen in listings)

            await eventually(gone_everywhere, what="the static decode gone from every worker")
        finally:
            await decode.stop()


PHASES = (
    "moriio_proxy_request_duration_seconds",
    "moriio_proxy_time_to_first_token_seconds",
    "moriio_proxy_decode_first_byte_seconds",
)


def total(metrics: str, sample: str, **labels: str) -> float:
    """The sum of the samples called ``sample`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


async def test_phase_histograms_add_up_and_a_gone_instance_leaves_the_export():
    """Workers count in prometheus-client's multiprocess files, which cannot forget a
    series: the export leaves out the per-instance series of an evicted instance."""
    async with fleet(2, "--decode-policy", "round_robin", "--eject-after", "0") as running:
        await running.add_sim("P")
        await running.add_sim("D", token_latency=0.02)  # streams spread over several writes
        bad = await running.add_sim("D", faults=SimFaults(status=500))
        await running.wait_ready(times=8)

        async def both_decodes_everywhere() -> bool:
            for _ in range(6):
                _, view = await get_json(running.url + "/admin/instances")
                if len(view["instances"]) != 3:
                    return False
            return True

        await eventually(both_decodes_everywhere, interval=0.1, what="three instances")
        prompts = [f"histogram prompt {i}" for i in range(12)]
        texts = await asyncio.gather(*(complete(running.url, p, stream=i % 2 == 0)
                                       for i, p in enumerate(prompts)))  # fmt: skip
        assert texts == [expected_text(p, 6) for p in prompts]  # retried past the bad one

        ok = {"endpoint": "completions", "mode": "READ", "outcome": "ok"}
        errors = "moriio_proxy_instance_errors_total"
        seen = set()
        for _ in range(8):
            text = await scrape(running.url)
            for name in PHASES:
                assert total(text, f"{name}_count", **ok) == 12, name
            assert total(text, "moriio_proxy_stream_chunks_per_second_count", **ok) == 6
            seen.add(total(text, errors, address=bad.http_address))
        assert len(seen) == 1 and seen.pop() >= 1  # the same sum whichever worker answers

        await bad.stop()  # evicted by the supervisor after the TTL, then by the mirrors
        running.sims.remove(bad)

        async def gone_everywhere() -> bool:
            for _ in range(6):
                if bad.http_address in await scrape(running.url):
                    return False
            return True

        await eventually(gone_everywhere, interval=0.2, what="the evicted decode's series gone")
        text = await scrape(running.url)
        assert total(text, "moriio_proxy_request_duration_seconds_count", **ok) == 12
