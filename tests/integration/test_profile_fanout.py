"""``POST /start_profile`` and ``/stop_profile`` through the proxy reach every instance, as
``vllm bench serve --profile`` needs when pointed at the proxy."""

from __future__ import annotations

from dataclasses import replace

import aiohttp

from moriio_proxy.protocol import Instance
from tests.harness import running_proxy


async def test_profiling_starts_and_stops_on_every_instance(http: aiohttp.ClientSession):
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P", profiler=True)
        decode = await proxy.add_sim("D", profiler=True)
        await proxy.wait_registered(1, 1)
        # vllm bench posts a completion-shaped body; vLLM ignores what it does not know.
        body = {"model": "sim-model", "prompt": "x", "profile_prefix": "run1"}
        async with http.post(proxy.url + "/start_profile", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer == {
            "action": "start_profile",
            "succeeded": 2,
            "failed": 0,
            "instances": [
                {"role": "P", "http_address": prefill.http_address, "status": 200, "error": None},
                {"role": "D", "http_address": decode.http_address, "status": 200, "error": None},
            ],
        }
        assert prefill.stats.profiling and decode.stats.profiling
        async with http.post(proxy.url + "/stop_profile") as resp:
            assert resp.status == 200
            assert (await resp.json())["succeeded"] == 2
        for sim in (prefill, decode):
            assert (sim.stats.profiles_started, sim.stats.profiles_stopped) == (1, 1)
            assert not sim.stats.profiling


async def test_one_failing_instance_makes_it_a_502_with_the_detail(
    http: aiohttp.ClientSession, dead_port: int
):
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P", profiler=True)
        decode = await proxy.add_sim("D")  # started without a profiler: vLLM answers 404
        await proxy.wait_registered(1, 1)
        gone = replace(
            decode_instance(proxy, decode.http_address), http_address=f"127.0.0.1:{dead_port}"
        )
        proxy.state.registry.upsert(gone, static=True)
        async with http.post(proxy.url + "/start_profile") as resp:
            assert resp.status == 502
            answer = await resp.json()
        assert (answer["succeeded"], answer["failed"]) == (1, 2)
        by_address = {i["http_address"]: i for i in answer["instances"]}
        assert by_address[prefill.http_address] == {
            "role": "P",
            "http_address": prefill.http_address,
            "status": 200,
            "error": None,
        }
        refused = by_address[decode.http_address]
        assert refused["status"] == 404
        assert refused["error"] == (
            'HTTP 404: {"detail": "Not Found"} (vLLM serves it only when started with '
            "--profiler-config)"
        )
        dead = by_address[f"127.0.0.1:{dead_port}"]
        assert dead["status"] is None and "ClientConnectorError" in dead["error"]
        assert prefill.stats.profiling  # the others were still started


async def test_profiling_with_nothing_registered_or_a_bad_timeout_is_refused(
    http: aiohttp.ClientSession,
):
    async with running_proxy() as proxy:
        async with http.post(proxy.url + "/start_profile") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == "no instance is registered"
        async with http.post(proxy.url + "/stop_profile?timeout=nope") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == (
                "timeout must be a number of seconds above 0 and at most 3600"
            )


def decode_instance(proxy, address: str) -> Instance:
    entry = proxy.state.registry.get(("D", address))
    assert entry is not None
    return entry.instance
