"""Failure semantics: every failure ends in one clear answer within a bound, the other leg
is cancelled (as the simulated instance sees it), and the next request succeeds."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from moriio_proxy.protocol import Instance
from moriio_proxy.sim import expected_text
from tests.harness import RunningProxy, read_sse, running_proxy
from tests.harness.clock import JumpingClock
from tests.harness.legs import refuses_connections
from tests.harness.serve import STOP_TIMEOUT, serve_process
from tests.harness.waiting import PROMPTLY

MODES = ["READ", "WRITE"]
PROMPT = "failure semantics under test"
# What an instance takes where the proxy must not wait for it: far beyond PROMPTLY, so a
# proxy that waited could not pass.
FOREVER = 120.0


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


@pytest.mark.parametrize("mode", MODES)
async def test_prefill_timeout_is_504_and_cancels_both_legs(mode: str):
    async with running_proxy(prefill_timeout=2.0, max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode=mode, prefill_latency=FOREVER)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        status, payload, took = await post(proxy.url, completion())
        assert status == 504
        assert payload["error"]["code"] == 504
        assert took < PROMPTLY
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
    async with running_proxy(decode_first_byte_timeout=2.0, max_retries=0) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", prefill_latency=FOREVER)
        await proxy.wait_registered(1, 1)
        for streaming in (False, True):
            status, events, took = await stream(proxy.url, completion(stream=streaming))
            assert status == 504, events
            assert events[0]["error"]["code"] == 504
            assert took < PROMPTLY
        await proxy.wait_for(lambda: decode.stats.cancelled == 2)
        decode.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


async def test_stream_idle_timeout_ends_with_an_sse_error_event():
    async with running_proxy(stream_idle_timeout=2.0) as proxy:
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
                decode.config.token_latency = FOREVER  # the engine goes quiet mid-stream
                events = await read_sse(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 504
        assert time.monotonic() - started < PROMPTLY
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        decode.config.token_latency = 0.0
        await next_request_succeeds(proxy)


async def test_end_to_end_deadline_bounds_a_long_stream():
    # The first token comes long before the deadline, the last long after it.
    deadline, tokens = 2.5, 1000
    async with running_proxy(request_timeout=deadline) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", token_latency=0.1)
        await proxy.wait_registered(1, 1)
        status, events, took = await stream(proxy.url, completion(tokens, stream=True))
        assert status == 200
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 504
        assert deadline - 0.1 < took < deadline + PROMPTLY
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        status, payload, took = await post(proxy.url, completion(tokens))
        assert status == 504
        assert "deadline" in payload["error"]["message"]
        assert took < deadline + PROMPTLY
        await proxy.wait_for(lambda: decode.stats.cancelled == 2)


async def test_dead_static_instance_is_ejected_and_skipped(dead_port: int):
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
        # 3 s each: both are still running when the third request arrives, even if late.
        slow = [asyncio.create_task(stream(proxy.url, completion(60, stream=True))) for _ in "ab"]
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
        prefill = await proxy.add_sim("P", mode=mode, prefill_latency=FOREVER)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        task = asyncio.create_task(post(proxy.url, completion()))
        await proxy.wait_for(lambda: prefill.stats.requests == 1)
        task.cancel()  # the client hangs up
        started = time.monotonic()
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1)
        if mode == "WRITE":
            await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0)
        assert time.monotonic() - started < PROMPTLY
        await proxy.wait_for(lambda: proxy.state.inflight == 0)
        prefill.config.prefill_latency = 0.0
        await next_request_succeeds(proxy)


async def test_read_mode_disconnect_after_prefill_releases_the_kv():
    """The client leaves while D is still starting: D still gets the leg, aborts it, and
    so P's blocks are released at once instead of after P's 60 s defer timeout."""
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P")
        decode = await proxy.add_sim("D", prefill_latency=FOREVER)
        await proxy.wait_registered(1, 1)
        task = asyncio.create_task(post(proxy.url, completion()))
        await proxy.wait_for(lambda: decode.stats.requests == 1)
        task.cancel()
        started = time.monotonic()
        # A non-streaming leg is given release_grace (1 s) to reach D, then aborted.
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        await proxy.wait_for(lambda: prefill.held_transfers() == 0)
        assert time.monotonic() - started < 1.0 + PROMPTLY  # far below the 60 s reaping
        assert prefill.stats.blocks_reaped == 0


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(workers: int):
    """SIGTERM (to the one process, or to the supervisor of several): new connections are
    refused, an in-flight stream ends normally, and the process exits 0."""
    async with serve_process("--workers", str(workers), "--drain-timeout", "10") as running:
        for role in "PD":
            await running.add_sim(role, token_latency=0.05)
        await running.wait_ready(times=4 * workers)
        body = completion(30, stream=True)
        async with (
            aiohttp.ClientSession() as s,
            s.post(running.url + "/v1/completions", json=body) as resp,
        ):
            assert resp.status == 200
            await resp.content.readline()
            running.proc.send_signal(signal.SIGTERM)
            await refuses_connections(running.url + "/ready")
            events = await read_sse(resp)
        assert events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
        code = await asyncio.wait_for(running.proc.wait(), STOP_TIMEOUT)
        assert code == 0, running.log_text()


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
            assert took < PROMPTLY
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
        prefill = await proxy.add_sim("P", mode="WRITE", prefill_latency=FOREVER)
        decode = await proxy.add_sim("D", mode="WRITE")
        await proxy.wait_registered(1, 1)
        await decode.set_faults(status=500)
        status, payload, took = await post(proxy.url, completion())
        assert status == 502
        assert "decode" in payload["error"]["message"]
        assert took < PROMPTLY
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1)
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
        assert took < PROMPTLY
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
    async with running_proxy(prefill_timeout=1.0, max_retries=0) as proxy:
        prefill = await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        await prefill.set_faults(stall_first_byte=float("inf"))
        status, _payload, took = await post(proxy.url, completion())
        assert status == 504
        assert took < PROMPTLY
        await proxy.wait_for(lambda: prefill.stats.cancelled == 1)
        await proxy.wait_for(lambda: decode.pending_kv_waiters() == 0)
        await prefill.set_faults(stall_first_byte=None)
        await next_request_succeeds(proxy)


async def test_unreachable_instance_that_still_heartbeats_is_ejected_then_retried():
    clock = JumpingClock()
    # A TTL far beyond the jump below: skipping the cooling period silences no one.
    async with running_proxy(
        clock=clock,
        prefill_policy="round_robin",
        eject_after=2,
        eject_seconds=60,
        instance_ttl=600,
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
        clock.advance(61)  # the cooling period ends; it is tried again and serves
        assert not registry.is_ejected(entry)
        before = flaky.stats.completed
        for i in range(4):
            assert (await post(proxy.url, completion(prompt=f"again {i}")))[0] == 200
        assert flaky.stats.completed > before
        assert not registry.is_ejected(entry)


def assert_no_dead(proxy: RunningProxy) -> None:
    for sim in proxy.sims:
        assert sim.dead_reason is None, sim.dead_reason
        assert sim.stats.garbage_outputs == 0
