"""``POST /start_profile`` and ``/stop_profile`` through the proxy reach every instance, as
``vllm bench serve --profile`` needs when pointed at the proxy."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp

from moriio_proxy.protocol import Instance
from tests.harness import running_proxy


async def test_profiling_starts_and_stops_on_every_instance(http: aiohttp.ClientSession):
    async with running_proxy(admin_allow_localhost=True) as proxy:  # no --admin-token
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
    async with running_proxy(admin_allow_localhost=True) as proxy:
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


async def test_an_instance_that_does_not_answer_in_time_is_reported(http: aiohttp.ClientSession):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # takes the request, never answers...
        await reader.read()  # ...until the proxy gives up and closes the connection
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_proxy(admin_allow_localhost=True) as proxy:
            prefill = await proxy.add_sim("P", profiler=True)
            await proxy.wait_registered(1, 0)
            entry = proxy.state.registry.get(("P", prefill.http_address))
            assert entry is not None
            hung = replace(entry.instance, role="D", http_address=f"127.0.0.1:{port}")
            proxy.state.registry.upsert(hung, static=True)
            async with http.post(proxy.url + "/stop_profile?timeout=0.5") as resp:
                assert resp.status == 502
                answer = await resp.json()
            assert answer["instances"][1] == {
                "role": "D",
                "http_address": f"127.0.0.1:{port}",
                "status": None,
                "error": "no answer within 0.5s",
            }
            assert answer["instances"][0]["error"] is None
    finally:
        server.close()
        await server.wait_closed()


async def test_profiling_with_nothing_registered_or_a_bad_timeout_is_refused(
    http: aiohttp.ClientSession,
):
    async with running_proxy(admin_allow_localhost=True) as proxy:
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
