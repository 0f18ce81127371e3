"""Failure semantics: every failure ends in one clear answer within a bound, the other leg
is cancelled (as the simulated instance sees it), and the next request succeeds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from moriio_proxy.protocol import Instance
from moriio_proxy.sim import SimConfig, SimInstance, expected_text
from tests.harness import RunningProxy, free_port, read_sse, running_proxy

MODES = ["READ", "WRITE"]
PROMPT = "failure semantics under test"
ROOT = Path(__file__).resolve().parents[2]


def completion(max_tokens: int = 4, stream: bool = False, prompt: str = PROMPT) -> dict:
    return {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


async def post(url: str, body: dict) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json(), time.monotonic() - started


async def stream(url: str, body: dict) -> tuple[int, list, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        events = await read_sse(r) if r.status == 200 else [await r.json()]
        return r.status, events, time.monotonic() - started


async def next_request_succeeds(proxy: RunningProxy) -> None:
    status, payload, _ = await post(proxy.url, completion(3, prompt="and now a good one"))
    assert status == 200, payload
    assert payload["choices"][0]["text"] == expected_text("and now a good one", 3)


def role(proxy: RunningProxy, name: str) -> SimInstance:
    return next(s for s in proxy.sims if s.config.role == name)


@pytest.mark.parametrize("mode", MODES)
async def test_prefill_timeout_is_504_and_cancels_both_legs(mode: str):
    async with running_proxy(prefill_timeout=0.4, max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode=mode, prefill_latency=3.0)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        status, payload, took = await post(proxy.url, completion())
        assert status == 504
        assert payload["error"]["code"] == 504
        assert took < 2.0
        await proxy.wait_for(lambda: all(leg.cancelled for leg in prefill.legs))
        if mode == "WRITE":  # the decode leg started at once and must not wait forever
            await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0)
            assert all(leg.cancelled or leg.finished for leg in decode.legs)
            assert decode.stats.completed == 0
        else:
            assert decode.stats.requests == 0
        prefill.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


async def test_decode_first_byte_timeout_is_504():
    async with running_proxy(decode_first_byte_timeout=0.4, max_retries=0) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", prefill_latency=3.0)
        await proxy.wait_registered(1, 1)
        for streaming in (False, True):
            status, events, took = await stream(proxy.url, completion(stream=streaming))
            assert status == 504, events
            assert events[0]["error"]["code"] == 504
            assert took < 2.0
        await proxy.wait_for(lambda: decode.stats.cancelled == 2)
        decode.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


async def test_stream_idle_timeout_ends_with_an_sse_error_event():
    async with running_proxy(stream_idle_timeout=0.3) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", token_latency=0.05)
        await proxy.wait_registered(1, 1)
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            body = completion(30, stream=True)
            async with s.post(proxy.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                decode.config.token_latency = 5.0  # the engine goes quiet mid-stream
                events = await read_sse(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 504
        assert time.monotonic() - started < 3.0
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        decode.config.token_latency = 0.0
        await next_request_succeeds(proxy)


async def test_end_to_end_deadline_bounds_a_long_stream():
    async with running_proxy(request_timeout=0.6) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", token_latency=0.1)
        await proxy.wait_registered(1, 1)
        status, events, took = await stream(proxy.url, completion(100, stream=True))
        assert status == 200
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 504
        assert 0.5 < took < 2.0
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        status, payload, took = await post(proxy.url, completion(100))
        assert status == 504
        assert "deadline" in payload["error"]["message"]
        assert took < 2.0
        await proxy.wait_for(lambda: decode.stats.cancelled == 2)


async def test_dead_static_instance_is_ejected_and_skipped():
    dead_port = free_port(23000)  # nothing listens there
    dead = Instance("P", f"127.0.0.1:{dead_port}", "127.0.0.1", 6301, 61005, 1, 1, "READ")
    async with running_proxy(
        static_instances=[dead], prefill_policy="round_robin", eject_after=2, eject_seconds=60
    ) as proxy:
        await proxy.add_sim("P")
        await proxy.add_sim("D")
        await proxy.wait_registered(2, 1)
        for i in range(6):
            status, payload, _ = await post(proxy.url, completion(prompt=f"{PROMPT} {i}"))
            assert status == 200, payload  # retried on the live prefill
        registry = proxy.state.registry
        (entry,) = [e for e in registry.entries() if e.static]
        assert registry.is_ejected(entry)
        metrics = proxy.state.metrics.registry
        assert metrics.get_sample_value("moriio_proxy_ejections_total", {"role": "P"}) == 1
        # Once ejected it is not tried at all: no more retries are needed.
        retries = metrics.get_sample_value("moriio_proxy_retries_total")
        for _ in range(4):
            assert (await post(proxy.url, completion()))[0] == 200
        assert metrics.get_sample_value("moriio_proxy_retries_total") == retries
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/instances") as r:
            states = {i["http_address"]: i["state"] for i in (await r.json())["instances"]}
        assert states[dead.http_address] == "ejected"


async def test_over_capacity_is_429_with_retry_after():
    async with running_proxy(max_inflight=2) as proxy:
        await proxy.add_sim("P")
        await proxy.add_sim("D", token_latency=0.05)
        await proxy.wait_registered(1, 1)
        slow = [asyncio.create_task(stream(proxy.url, completion(20, stream=True))) for _ in "ab"]
        await proxy.wait_for(lambda: proxy.state.inflight == 2)
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + "/v1/completions", json=completion()) as resp,
        ):
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == 429
        for task in slow:
            status, events, _ = await task
            assert status == 200 and events[-1] == "[DONE]"
        await next_request_succeeds(proxy)


@pytest.mark.parametrize("mode", MODES)
async def test_client_disconnect_during_prefill_cancels_both_legs(mode: str):
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P", mode=mode, prefill_latency=2.0)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        task = asyncio.create_task(post(proxy.url, completion()))
        await proxy.wait_for(lambda: prefill.stats.requests == 1)
        task.cancel()  # the client hangs up
        started = time.monotonic()
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1, timeout=1.0)
        if mode == "WRITE":
            await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0, timeout=1.0)
        assert time.monotonic() - started < 1.0
        await proxy.wait_for(lambda: proxy.state.inflight == 0)
        prefill.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


async def test_read_mode_disconnect_after_prefill_releases_the_kv():
    """The client leaves while D is still starting: D still gets the leg, aborts it, and
    so P's blocks are released at once instead of after P's 60 s defer timeout."""
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P")
        decode = await proxy.add_sim("D", prefill_latency=2.0)
        await proxy.wait_registered(1, 1)
        task = asyncio.create_task(post(proxy.url, completion()))
        await proxy.wait_for(lambda: decode.stats.requests == 1)
        task.cancel()
        # A non-streaming leg is given release_grace (1 s) to reach D, then aborted.
        await proxy.wait_for(lambda: decode.stats.cancelled == 1, timeout=2.5)
        await proxy.wait_for(lambda: prefill.held_transfers() == 0, timeout=1.0)
        assert prefill.stats.blocks_reaped == 0


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones():
    """SIGTERM: /ready turns 503, new connections are refused, an in-flight stream ends
    normally, and the process exits 0."""
    port, discovery = free_port(24000), free_port(24500)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moriio_proxy",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--discovery-host",
            "127.0.0.1",
            "--discovery-port",
            str(discovery),
            "--drain-timeout",
            "10",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        sims = [
            SimInstance(SimConfig(role=r, proxy=f"127.0.0.1:{discovery}", heartbeat_interval=0.2,
                                  token_latency=0.05))
            for r in "PD"
        ]  # fmt: skip
        for sim in sims:
            await sim.start()
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    try:
                        async with s.get(base + "/ready") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                body = completion(30, stream=True)
                async with s.post(base + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.content.readline()
                    os.kill(proc.pid, signal.SIGTERM)
                    await asyncio.sleep(0.3)
                    with pytest.raises(aiohttp.ClientConnectionError):
                        async with aiohttp.ClientSession() as other:
                            await other.get(base + "/ready")
                    events = await read_sse(resp)
                assert events[-1] == "[DONE]"
                assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
        finally:
            for sim in sims:
                await sim.stop()

    try:
        asyncio.run(scenario())
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# ------------------------------------------------------------ injected instance faults


@pytest.mark.parametrize("mode", MODES)
async def test_failing_prefill_is_one_clear_error_and_cancels_the_decode(mode: str):
    async with running_proxy(max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        await prefill.set_faults(status=500)
        for streaming in (False, True):
            status, events, took = await stream(proxy.url, completion(stream=streaming))
            assert status == 502
            assert events[0]["error"]["code"] == 502
            assert "prefill" in events[0]["error"]["message"]
            assert took < 1.0
        # The decode never got to wait for KV that will not come.
        await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0)
        assert decode.stats.completed == 0
        if mode == "READ":
            assert decode.stats.requests == 0
        await prefill.set_faults(status=None)
        await next_request_succeeds(proxy)


@pytest.mark.parametrize("mode", MODES)
async def test_failing_prefill_is_retried_on_another_pair(mode: str):
    async with running_proxy(prefill_policy="round_robin", eject_after=0) as proxy:
        broken = await proxy.add_sim("P", mode=mode)
        await proxy.add_sim("P", mode=mode)
        await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(2, 1)
        await broken.set_faults(status=503)
        for i in range(6):
            status, payload, _ = await post(proxy.url, completion(prompt=f"{PROMPT} {i}"))
            assert status == 200, payload
            assert payload["choices"][0]["text"] == expected_text(f"{PROMPT} {i}", 4)
        assert broken.stats.faults_applied["status"] >= 1
        assert_no_dead(proxy)


async def test_write_decode_failure_cancels_a_running_prefill():
    async with running_proxy(max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode="WRITE", prefill_latency=2.0)
        decode = await proxy.add_sim("D", mode="WRITE")
        await proxy.wait_registered(1, 1)
        await decode.set_faults(status=500)
        status, payload, took = await post(proxy.url, completion())
        assert status == 502
        assert "decode" in payload["error"]["message"]
        assert took < 1.0
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1, timeout=1.0)
        await decode.set_faults(status=None)
        prefill.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


@pytest.mark.parametrize("mode", MODES)
async def test_decode_dying_mid_stream_ends_with_an_error_event(mode: str):
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode, token_latency=0.01)
        await proxy.wait_registered(1, 1)
        await decode.set_faults(die_after_tokens=3)
        status, events, took = await stream(proxy.url, completion(10, stream=True))
        assert status == 200
        texts = [e["choices"][0]["text"] for e in events[:-2] if e.get("choices")]
        assert "".join(texts) == expected_text(PROMPT, 3)
        assert events[-2]["error"]["code"] == 502
        assert events[-1] == "[DONE]"
        assert took < 2.0
        await decode.set_faults(die_after_tokens=None)
        await next_request_succeeds(proxy)


async def test_decode_dying_before_the_first_byte_is_retried():
    async with running_proxy(decode_policy="round_robin", eject_after=0) as proxy:
        await proxy.add_sim("P")
        broken = await proxy.add_sim("D")
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 2)
        await broken.set_faults(die_after_tokens=0)
        for i in range(4):
            prompt = f"{PROMPT} {i}"
            status, events, _ = await stream(proxy.url, completion(5, stream=True, prompt=prompt))
            assert status == 200
            assert events[-1] == "[DONE]"
            text = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
            assert text == expected_text(prompt, 5)
        assert broken.stats.faults_applied["die_after_tokens"] >= 1


@pytest.mark.parametrize("mode", MODES)
async def test_stalled_prefill_times_out_and_is_cancelled(mode: str):
    async with running_proxy(prefill_timeout=0.5, max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        await prefill.set_faults(stall_first_byte=float("inf"))
        status, _payload, took = await post(proxy.url, completion())
        assert status == 504
        assert took < 1.5
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1, timeout=1.0)
        await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0, timeout=1.0)
        await prefill.set_faults(stall_first_byte=None)
        await next_request_succeeds(proxy)


async def test_unreachable_instance_that_still_heartbeats_is_ejected_then_retried():
    async with running_proxy(
        prefill_policy="round_robin", eject_after=2, eject_seconds=1.0
    ) as proxy:
        flaky = await proxy.add_sim("P")
        await proxy.add_sim("P")
        await proxy.add_sim("D")
        await proxy.wait_registered(2, 1)
        await flaky.set_faults(refuse_connections=True)
        registry = proxy.state.registry
        entry = next(e for e in registry.entries() if e.instance.http_address == flaky.http_address)
        for i in range(4):
            assert (await post(proxy.url, completion(prompt=f"{PROMPT} {i}")))[0] == 200
        assert registry.is_ejected(entry)  # heartbeats kept arriving all along
        await flaky.set_faults(refuse_connections=False)
        await asyncio.sleep(1.1)  # the cooling period ends; it is tried again and serves
        before = flaky.stats.completed
        for i in range(4):
            assert (await post(proxy.url, completion(prompt=f"again {i}")))[0] == 200
        assert flaky.stats.completed > before
        assert not registry.is_ejected(entry)


def assert_no_dead(proxy: RunningProxy) -> None:
    for sim in proxy.sims:
        assert sim.dead_reason is None, sim.dead_reason
        assert sim.stats.garbage_outputs == 0
