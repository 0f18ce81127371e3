"""The proxy over real sockets with simulated vLLM MoRI-IO instances.

The simulator fails the way vLLM 0.32 does (a malformed leg kills its engine, a READ
decode without valid block ids returns wrong text, a WRITE decode without a matching
transfer waits forever), so "the answer equals expected_text" proves the legs were right.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import zmq
import zmq.asyncio

from moriio_proxy.sim import expected_text
from tests.harness import RunningProxy, read_sse, running_proxy

MODES = ["READ", "WRITE"]
PROMPT = "The quick brown fox jumps over the lazy dog"


def assert_healthy(proxy: RunningProxy) -> None:
    """No simulated engine died or produced text from missing KV."""
    for sim in proxy.sims:
        assert sim.dead_reason is None, sim.dead_reason
        assert sim.stats.garbage_outputs == 0


@pytest.fixture(params=MODES)
async def proxy(request):
    """A proxy with one prefill and one decode instance, in each mode."""
    async with running_proxy() as running:
        await running.add_sim("P", mode=request.param)
        await running.add_sim("D", mode=request.param)
        await running.wait_registered(1, 1)
        yield running


def leaks_internal_id(text: str) -> bool:
    return "___prefill_addr_" in text or "___decode_addr_" in text


async def test_completion_non_streaming(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 12}
    async with http.post(
        proxy.url + "/v1/completions", json=body, headers={"X-Request-Id": "client-42"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "client-42"
        raw = await resp.text()
    payload = json.loads(raw)
    assert payload["choices"][0]["text"] == expected_text(PROMPT, 12)
    assert payload["usage"]["completion_tokens"] == 12
    assert payload["id"] == "cmpl-client-42"
    assert "kv_transfer_params" not in payload
    assert not leaks_internal_id(raw)
    assert_healthy(proxy)


async def test_completion_streaming(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {
        "model": "sim-model",
        "prompt": PROMPT,
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected_text(PROMPT, 7)
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert len({c["id"] for c in chunks}) == 1
    assert not any(leaks_internal_id(json.dumps(c)) for c in chunks)
    assert_healthy(proxy)


async def test_chat_without_max_tokens(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}
    async with http.post(proxy.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        payload = await resp.json()
    decode = next(s for s in proxy.sims if s.config.role == "D")
    assert payload["object"] == "chat.completion"
    assert payload["id"].startswith("chatcmpl-")
    assert not leaks_internal_id(payload["id"])
    content = payload["choices"][0]["message"]["content"]
    assert payload["usage"]["completion_tokens"] == decode.config.default_max_tokens
    assert content == expected_text(f"user: {PROMPT}\n", decode.config.default_max_tokens)
    assert_healthy(proxy)


async def test_chat_streaming(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 5,
        "stream": True,
    }
    async with http.post(proxy.url + "/v1/chat/completions", json=body) as resp:
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert text == expected_text(f"user: {PROMPT}\n", 5)
    assert all(c["id"].startswith("chatcmpl-") for c in events[:-1])
    assert_healthy(proxy)


async def test_max_tokens_one_is_not_decremented(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1}
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        payload = await resp.json()
    assert payload["choices"][0]["text"] == expected_text(PROMPT, 1)
    decode = next(s for s in proxy.sims if s.config.role == "D")
    assert decode.legs[-1].body["max_tokens"] == 1
    assert_healthy(proxy)


async def test_client_kv_transfer_params_are_replaced(
    proxy: RunningProxy, http: aiohttp.ClientSession
):
    body = {
        "model": "sim-model",
        "prompt": PROMPT,
        "max_tokens": 3,
        "kv_transfer_params": {"prompt_token_ids": [1, 2, 3], "remote_host": "evil"},
    }
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        payload = await resp.json()
    assert payload["choices"][0]["text"] == expected_text(PROMPT, 3)
    for sim in proxy.sims:
        params = sim.legs[-1].body["kv_transfer_params"]
        assert "prompt_token_ids" not in params
        assert params.get("remote_host") != "evil"
    assert_healthy(proxy)


async def test_prefill_that_finishes_the_request_answers_alone(
    proxy: RunningProxy, http: aiohttp.ClientSession
):
    prompt = "tell me nothing [sim:eos]"
    for stream in (False, True):
        body = {"model": "sim-model", "prompt": prompt, "max_tokens": 9, "stream": stream}
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            if stream:
                events = await read_sse(resp)
                assert events[-1] == "[DONE]"
                finish = [c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"]]
                assert finish[-1] == "stop"
            else:
                payload = await resp.json()
                assert payload["choices"][0]["finish_reason"] == "stop"
                assert not leaks_internal_id(json.dumps(payload))
    decode = next(s for s in proxy.sims if s.config.role == "D")
    if proxy.state.registry.mode == "READ":
        assert decode.stats.requests == 0  # never a plain request to a READ decode
    else:
        # WRITE started the decode leg at once; the proxy must have ended it (cancelled
        # while waiting, or discarded if it already ran), so nothing waits for KV.
        await proxy.wait_for(
            lambda: (
                decode.pending_kv_waiters() == 0
                and all(leg.cancelled or leg.finished for leg in decode.legs)
            )
        )
    for sim in proxy.sims:
        assert sim.dead_reason is None


@pytest.mark.parametrize("mode", MODES)
async def test_two_by_two_spread(mode: str, http: aiohttp.ClientSession):
    async with running_proxy(prefill_policy="round_robin", decode_policy="round_robin") as proxy:
        for role in ("P", "P", "D", "D"):
            await proxy.add_sim(role, mode=mode)
        await proxy.wait_registered(2, 2)
        for i in range(8):
            body = {"model": "sim-model", "prompt": f"{PROMPT} {i}", "max_tokens": 4}
            async with http.post(proxy.url + "/v1/completions", json=body) as resp:
                payload = await resp.json()
                assert payload["choices"][0]["text"] == expected_text(f"{PROMPT} {i}", 4)
        assert [s.stats.completed for s in proxy.sims] == [4, 4, 4, 4]
        assert_healthy(proxy)


@pytest.mark.parametrize("mode", MODES)
async def test_dp4_prefill_ranks_spread(mode: str, http: aiohttp.ClientSession):
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P", mode=mode, dp_size=4)
        await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        for i in range(8):
            body = {"model": "sim-model", "prompt": f"{PROMPT} {i}", "max_tokens": 3}
            async with http.post(proxy.url + "/v1/completions", json=body) as resp:
                payload = await resp.json()
                assert payload["choices"][0]["text"] == expected_text(f"{PROMPT} {i}", 3)
        assert prefill.stats.per_rank == {0: 2, 1: 2, 2: 2, 3: 2}
        ranks = {leg.headers.get("X-data-parallel-rank") for leg in prefill.legs}
        assert ranks == {"0", "1", "2", "3"}
        assert_healthy(proxy)


async def test_silent_instance_is_evicted_and_traffic_moves(http: aiohttp.ClientSession):
    # The TTL is ten heartbeats: a busy machine may delay one or two, never ten.
    async with running_proxy(instance_ttl=2.0, decode_policy="round_robin") as proxy:
        await proxy.add_sim("P")
        quiet = await proxy.add_sim("D")
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 2)
        quiet.heartbeating = False
        registry = proxy.state.registry
        await proxy.wait_for(
            lambda: quiet.http_address not in {e.instance.http_address for e in registry.entries()}
        )
        async with http.get(proxy.url + "/admin/instances") as resp:
            listed = (await resp.json())["instances"]
        assert quiet.http_address not in {i["http_address"] for i in listed}
        before = quiet.stats.requests
        for _ in range(4):
            body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
            async with http.post(proxy.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
        assert quiet.stats.requests == before
        quiet.heartbeating = True  # a returning instance is re-added
        await proxy.wait_registered(1, 2)
        assert_healthy(proxy)


async def test_garbage_on_the_discovery_port_does_not_stop_discovery(
    http: aiohttp.ClientSession,
):
    async with running_proxy() as proxy:
        host, port = proxy.discovery.split(":")
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{proxy.discovery}")
        for junk in (b"", b"\xff\x00garbage", b"\x93\x01\x02\x03", b"\x81\xa4type\xa1X"):
            await dealer.send(junk)
        await dealer.send_multipart([b"a", b"b", b"c"])
        await dealer.send(b"\x00" * (1 << 20))  # over the size cap: libzmq drops the peer
        # Raw TCP that is not ZMQ at all.
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 100)
        await writer.drain()
        writer.close()
        metrics = proxy.state.metrics.registry

        def rejected(reason: str) -> float:
            value = metrics.get_sample_value(
                "moriio_proxy_registrations_rejected_total", {"reason": reason}
            )
            return value or 0.0

        # Messages on one connection arrive in order: the three frames came last.
        await proxy.wait_for(lambda: rejected("bad_frames") == 1)
        dealer.close()
        ctx.term()
        assert rejected("bad_msgpack") == 2  # the empty frame and the garbage
        assert rejected("not_a_map") == 1 and rejected("unknown_type") == 1
        await proxy.add_sim("P")
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        assert_healthy(proxy)


async def test_no_instances_is_503(http: aiohttp.ClientSession):
    async with running_proxy() as proxy:
        body = {"model": "sim-model", "prompt": PROMPT}
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
            assert error["code"] == 503 and "prefill" in error["message"]
        async with http.get(proxy.url + "/ready") as resp:
            assert resp.status == 503
        await proxy.add_sim("P")
        await proxy.wait_registered(1, 0)
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
            assert "decode" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": "a", "n": 2}, "n"),
        ({"model": "m"}, "prompt"),
    ],
)
async def test_requests_that_cannot_be_one_pair_are_400(
    proxy: RunningProxy, http: aiohttp.ClientSession, body: dict, param: str
):
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == param
    assert all(s.stats.requests == 0 for s in proxy.sims)


async def test_bad_json_is_400(proxy: RunningProxy, http: aiohttp.ClientSession):
    async with http.post(proxy.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "BadRequestError"


async def test_engine_400_reaches_the_client(proxy: RunningProxy, http: aiohttp.ClientSession):
    body = {"model": "sim-model", "prompt": "word " * 5000, "max_tokens": 4}
    async with http.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == 400
        assert not leaks_internal_id(error["message"])
    assert_healthy(proxy)


async def test_models_lists_the_union(proxy: RunningProxy, http: aiohttp.ClientSession):
    async with http.get(proxy.url + "/v1/models") as resp:
        payload = await resp.json()
    assert [m["id"] for m in payload["data"]] == ["sim-model"]


async def test_dead_prefill_is_retried_on_a_fresh_pair(http: aiohttp.ClientSession):
    # A TTL no busy machine reaches during the test: the stopped one stays registered.
    async with running_proxy(prefill_policy="round_robin", instance_ttl=30) as proxy:
        gone = await proxy.add_sim("P")
        await proxy.add_sim("P")
        await proxy.add_sim("D")
        await proxy.wait_registered(2, 1)
        gone.heartbeating = False
        await gone.stop()  # still registered until the TTL: connections are refused
        for i in range(4):
            body = {"model": "sim-model", "prompt": f"{PROMPT} {i}", "max_tokens": 2}
            async with http.post(proxy.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["text"] == expected_text(
                    f"{PROMPT} {i}", 2
                )
        retries = proxy.state.metrics.registry.get_sample_value("moriio_proxy_retries_total")
        assert retries and retries >= 1


@pytest.mark.parametrize("mode", MODES)
async def test_client_disconnect_cancels_the_decode(mode: str):
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode, token_latency=0.05)
        await proxy.wait_registered(1, 1)
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 200, "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + "/v1/completions", json=body) as resp,
        ):
            async for _ in resp.content:
                break  # one line, then hang up
        await proxy.wait_for(lambda: decode.stats.cancelled == 1)
        await proxy.wait_for(
            lambda: all(e.total_inflight == 0 for e in proxy.state.registry.entries())
        )


@pytest.mark.parametrize("mode", MODES)
async def test_200_concurrent_streams_exact_tokens(mode: str):
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode)
        await proxy.add_sim("D", mode=mode, token_latency=0.001)
        await proxy.wait_registered(1, 1)

        async def one(i: int, session: aiohttp.ClientSession) -> tuple[str, str]:
            prompt = f"{PROMPT} number {i}"
            body = {
                "model": "sim-model",
                "prompt": prompt,
                "max_tokens": 16 + i % 5,
                "stream": True,
            }
            async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                events = await read_sse(resp)
            assert events[-1] == "[DONE]"
            text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
            return text, expected_text(prompt, 16 + i % 5)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(*(one(i, session) for i in range(200)))
        assert all(got == want for got, want in results)
        assert_healthy(proxy)
        assert all(e.total_inflight == 0 for e in proxy.state.registry.entries())
