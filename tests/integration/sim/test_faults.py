"""Fault injection (SimFaults) observed from a plain client.

Each fault kind is driven directly with aiohttp (no proxy), so what the proxy's
failure-semantics tests will see is pinned down here: status codes and error shapes, cut
streams, stalls, an unreachable-but-heartbeating instance and seeded probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from moriio_proxy.sim import SimFaults, expected_text
from tests.harness.legs import PROMPT, prefill_body, prefill_params, sim
from tests.harness.sse import read_sse_until_cut, sse_events
from tests.harness.waiting import PROMPTLY, STATE_TIMEOUT, eventually


async def test_status_fault_vllm_error_shape(http: aiohttp.ClientSession) -> None:
    async with sim("P", faults=SimFaults(status=503)) as p:
        async with http.post(
            p.url + "/v1/completions", json=prefill_body(prefill_params("tx-f"))
        ) as r:
            assert r.status == 503
            body = await r.json()
        err = body["error"]
        assert err["type"] == "ServiceUnavailableError" and err["code"] == 503
        assert err["param"] is None and "SimFaults.status" in err["message"]
        assert p.held_transfers() == 0  # the engine never saw the prefill leg: no KV blocks
        leg = p.legs[-1]
        assert leg.kind == "prefill" and leg.body is not None
        assert leg.faults == ["status"] and leg.status == 503 and not leg.started
        assert p.stats.errors_5xx == 1 and p.stats.faults_applied == {"status": 1}

        p.faults.status = 429  # mutate at run time
        messages = [{"role": "user", "content": "hi"}]
        async with http.post(p.url + "/v1/chat/completions", json={"messages": messages}) as r:
            assert r.status == 429
            assert (await r.json())["error"]["type"] == "TooManyRequestsError"
        # validation still comes first; the other endpoints are never faulted
        async with http.post(p.url + "/v1/completions", json={"max_tokens": 2}) as r:
            assert r.status == 400
        for path in ("/health", "/v1/models", "/sim/stats"):
            async with http.get(p.url + path) as r:
                assert r.status == 200, path
        assert p.stats.faults_applied == {"status": 2}
        assert p.stats.errors_4xx == 2


async def test_die_after_tokens_cuts_stream_after_exactly_k_chunks(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", token_latency=0.002, faults=SimFaults(die_after_tokens=3)) as p:
        body = {"prompt": PROMPT, "max_tokens": 10, "stream": True}
        async with http.post(p.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            events, error = await read_sse_until_cut(r)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert "[DONE]" not in events and len(events) == 3
        assert "".join(e["choices"][0]["text"] for e in events) == expected_text(PROMPT, 3)
        assert all(e["choices"][0]["finish_reason"] is None for e in events)
        leg = p.legs[-1]
        assert leg.faults == ["die_after_tokens"]
        assert not leg.finished and not leg.cancelled and leg.finished_at is not None
        assert p.stats.faults_applied == {"die_after_tokens": 1} and p.stats.cancelled == 0

        # chat: the role chunk, then k token chunks
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True}
        async with http.post(p.url + "/v1/chat/completions", json=chat) as r:
            events, error = await read_sse_until_cut(r)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert len(events) == 1 + 3

        # a request shorter than k completes normally and is not counted
        async with http.post(p.url + "/v1/completions", json=dict(body, max_tokens=2)) as r:
            events, error = await read_sse_until_cut(r)
        assert error is None and events[-1] == "[DONE]"
        assert p.stats.faults_applied == {"die_after_tokens": 2}
        assert p.stats.completed == 1


async def test_die_after_tokens_prefill_leg_gets_no_response(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", defer_timeout=1.0, faults=SimFaults(die_after_tokens=1)) as p:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(
                p.url + "/v1/completions", json=prefill_body(prefill_params("tx-1"))
            ) as r:
                await r.read()
        # the engine had finished the one token: 0.32 holds the blocks until defer_timeout
        assert p.held_transfers() == 1
        await eventually(lambda: p.held_transfers() == 0)
        assert p.stats.blocks_reaped == 1

        p.faults.die_after_tokens = 0  # cut before any token: the engine request is aborted
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(
                p.url + "/v1/completions", json=prefill_body(prefill_params("tx-0"))
            ) as r:
                await r.read()
        await eventually(lambda: p.held_transfers() == 0)
        assert p.stats.faults_applied == {"die_after_tokens": 2}
        assert p.stats.completed == 0 and p.dead_reason is None


async def test_stall_first_byte_forever_then_client_gives_up(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", faults=SimFaults(stall_first_byte=math.inf)) as p:
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(
                p.url + "/v1/completions",
                json=prefill_body(prefill_params("tx-f")),
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as r:
                await r.read()
        # The hang-up is noticed at once: the stall itself would never end.
        await eventually(lambda: p.legs[-1].cancelled, timeout=PROMPTLY)
        leg = p.legs[-1]
        assert leg.faults == ["stall_first_byte"] and not leg.started and not leg.finished
        assert p.stats.cancelled == 1 and p.held_transfers() == 0

        # a finite stall delays the headers, then the request is served normally
        p.faults.stall_first_byte = 0.2
        t0 = time.monotonic()
        body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
        async with http.post(p.url + "/v1/completions", json=body) as r:
            headers_at = time.monotonic() - t0
            events, error = await read_sse_until_cut(r)
        assert headers_at >= 0.2 and error is None and events[-1] == "[DONE]"
        assert p.stats.faults_applied == {"stall_first_byte": 2}

        # stopping the instance answers a request stalled forever (503), it does not hang
        p.faults.stall_first_byte = math.inf
        task = asyncio.ensure_future(http.post(p.url + "/v1/completions", json=body))
        await eventually(lambda: p.stats.faults_applied["stall_first_byte"] == 3)
        t0 = time.monotonic()
        await p.stop()
        r = await asyncio.wait_for(task, STATE_TIMEOUT)
        assert r.status == 503 and time.monotonic() - t0 < PROMPTLY  # the stall never ends
        r.release()


async def test_stall_after_tokens_mid_stream(http: aiohttp.ClientSession) -> None:
    stall = 2.0
    faults = SimFaults(stall_after_tokens=(2, stall))
    async with sim("D", mode="WRITE", token_latency=0.002, faults=faults) as d:
        body = {"prompt": PROMPT, "max_tokens": 5, "stream": True}
        async with http.post(d.url + "/v1/completions", json=body) as r:
            stamps: list[float] = []
            events: list[Any] = []
            async for raw in r.content:
                new = sse_events(raw)
                stamps.extend(time.monotonic() for _ in new)
                events.extend(new)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_text(PROMPT, 5)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        # Stamped as this client reads them, so a busy machine shifts each either way: the
        # stall (between token 2 and token 3) need only stand out from the rest by far.
        assert gaps[1] > stall / 2
        assert max(gaps[:1] + gaps[2:]) < stall / 2

        # silent forever: the connection stays open until the client leaves
        d.faults = SimFaults(stall_after_tokens=(2, "inf"))  # type: ignore[arg-type]
        async with http.post(d.url + "/v1/completions", json=body) as r:
            got = []
            while len(got) < 2:
                got.extend(sse_events(await r.content.readline()))
            assert await r.content.readline() == b"\n"  # the end of event 2
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.content.readline(), 0.2)
            assert not r.content.at_eof()
            r.close()
        await eventually(lambda: d.legs[-1].cancelled, timeout=PROMPTLY)  # the stall never ends
        assert d.legs[-1].faults == ["stall_after_tokens"]
        assert d.stats.faults_applied == {"stall_after_tokens": 2}


async def test_refuse_connections_keeps_heartbeating(http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
    try:
        async with sim(
            "D",
            proxy=f"127.0.0.1:{port}",
            heartbeat_interval=0.05,
            control_port=0,
            token_latency=0.02,
        ) as d:
            url, http_port = d.url, d.port
            body = {"prompt": "single", "max_tokens": 2}
            async with http.post(url + "/v1/completions", json=body) as r:  # pools a conn
                assert r.status == 200
            slow = await http.post(
                url + "/v1/completions", json={"prompt": "one", "max_tokens": 15, "stream": True}
            )
            assert slow.status == 200

            d.faults.refuse_connections = True  # a mutation takes effect within ~20 ms
            await eventually(lambda: d.refusing)
            for session in (http, None):  # pooled keep-alive connection, then a fresh one
                async with contextlib.AsyncExitStack() as stack:
                    s = session or await stack.enter_async_context(aiohttp.ClientSession())
                    with pytest.raises(aiohttp.ClientConnectorError):
                        async with s.post(url + "/v1/completions", json=body):
                            pass
            events, error = await read_sse_until_cut(slow)  # the in-flight request was unaffected
            assert error is None and events[-1] == "[DONE]" and len(events) == 16
            slow.release()

            while await router.poll(0):  # heartbeats continue while unreachable
                await router.recv_multipart()
            assert await router.poll(STATE_TIMEOUT * 1000) != 0

            ctl = d.control_url
            assert ctl is not None and d.control_port != http_port
            async with http.get(ctl + "/sim/stats") as r:
                stats = await r.json()
            assert stats["refusing"] is True and stats["faults_applied"] == {
                "refuse_connections": 1
            }
            async with http.post(ctl + "/sim/faults", json={"refuse_connections": False}) as r:
                assert r.status == 200
            assert not d.refusing and d.port == http_port
            async with http.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200  # same port, same registered http_address

            await d.set_faults(refuse_connections=True)  # awaited: refused on return
            assert d.refusing
            with pytest.raises(aiohttp.ClientConnectorError):
                async with http.get(url + "/health"):
                    pass
            await d.set_faults(refuse_connections=False)
            async with http.get(url + "/health") as r:
                assert r.status == 200
            assert d.stats.faults_applied == {"refuse_connections": 2}
    finally:
        router.close(linger=0)
        ctx.term()


async def test_probability_is_seeded_and_repeatable(http: aiohttp.ClientSession) -> None:
    async def pattern(seed: int) -> list[int]:
        faults = SimFaults(status=500, probability=0.5)
        async with sim("P", seed=seed, faults=faults) as p:
            out = []
            for _ in range(40):
                body = {"prompt": "a b", "max_tokens": 1}
                async with http.post(p.url + "/v1/completions", json=body) as r:
                    out.append(r.status)
                    await r.read()
            assert p.stats.faults_applied.get("status", 0) == out.count(500)
            return out

    first = await pattern(7)
    assert set(first) == {200, 500}
    assert 10 <= first.count(500) <= 30
    assert await pattern(7) == first
    assert await pattern(8) != first
