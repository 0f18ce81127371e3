"""The official ``openai`` Python SDK as the client of the proxy.

Against simulated instances (always: no vLLM needed) and, when the real tier is set up
(tests/real/README.md), against real vLLM engines. The SDK parses every response into
its own models (so a shape the proxy got wrong is a pydantic/validation failure or a
missing attribute here) and turns HTTP errors into its own exception types, which is what
application code catches.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import openai
import pytest

from moriio_proxy.sim import SimFaults, expected_text
from tests.harness import RunningProxy, running_proxy
from tests.real.conftest import Engines, real_stack

PROMPT = "The quick brown fox jumps over the lazy dog"
CHAT = [{"role": "user", "content": PROMPT}]
CHAT_TEXT = f"user: {PROMPT}\n"  # what the simulator's chat template renders


def sdk(url: str) -> openai.AsyncOpenAI:
    """No SDK retries: every status the proxy sends must reach the test as it is."""
    return openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )


@pytest.fixture
async def client(proxy: RunningProxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(proxy.url) as c:
        yield c


async def sim_pair(mode: str, **overrides: object):
    cm = running_proxy(**overrides)
    proxy = await cm.__aenter__()
    await proxy.add_sim("P", mode=mode, max_model_len=64)
    await proxy.add_sim("D", mode=mode, max_model_len=64)
    await proxy.wait_registered(1, 1)
    return cm, proxy


@pytest.fixture(params=["READ", "WRITE"])
async def proxy(request: pytest.FixtureRequest) -> AsyncIterator[RunningProxy]:
    cm, running = await sim_pair(request.param)
    try:
        yield running
    finally:
        await cm.__aexit__(None, None, None)


def assert_healthy(proxy: RunningProxy) -> None:
    for sim in proxy.sims:
        assert sim.dead_reason is None, sim.dead_reason
        assert sim.stats.garbage_outputs == 0


# ---------------------------------------------------------------- simulated instances


async def test_sdk_completion(proxy: RunningProxy, client: openai.AsyncOpenAI):
    raw = await client.completions.with_raw_response.create(
        model="sim-model", prompt=PROMPT, max_tokens=9, extra_headers={"X-Request-Id": "sdk-1"}
    )
    assert raw.headers["x-request-id"] == "sdk-1"
    completion = raw.parse()
    assert isinstance(completion, openai.types.Completion)
    assert completion.id == "cmpl-sdk-1"
    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected_text(PROMPT, 9)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 9
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert_healthy(proxy)


async def test_sdk_completion_stream(proxy: RunningProxy, client: openai.AsyncOpenAI):
    stream = await client.completions.create(
        model="sim-model",
        prompt=PROMPT,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(PROMPT, 6)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert_healthy(proxy)


async def test_sdk_chat(proxy: RunningProxy, client: openai.AsyncOpenAI):
    chat = await client.chat.completions.create(
        model="sim-model", messages=CHAT, max_completion_tokens=5
    )
    assert isinstance(chat, openai.types.chat.ChatCompletion)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected_text(CHAT_TEXT, 5)
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert_healthy(proxy)


async def test_sdk_chat_stream(proxy: RunningProxy, client: openai.AsyncOpenAI):
    stream = await client.chat.completions.create(
        model="sim-model",
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(CHAT_TEXT, 4)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert_healthy(proxy)


async def test_sdk_models(proxy: RunningProxy, client: openai.AsyncOpenAI):
    models = [m.id async for m in client.models.list()]
    assert models == ["sim-model"]


async def test_sdk_engine_400_is_bad_request(proxy: RunningProxy, client: openai.AsyncOpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="sim-model", prompt="word " * 100, max_tokens=2)
    assert caught.value.status_code == 400
    assert "maximum context length is 64" in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == 400
    assert_healthy(proxy)


async def test_sdk_proxy_400_is_bad_request(proxy: RunningProxy, client: openai.AsyncOpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=2, n=2)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"


async def test_sdk_no_instances_is_503():
    async with running_proxy() as proxy, sdk(proxy.url) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=2)
    assert caught.value.status_code == 503
    assert "prefill" in caught.value.body["message"]


async def test_sdk_failing_prefill_is_502():
    cm, proxy = await sim_pair("READ", max_retries=0)
    try:
        prefill = next(s for s in proxy.sims if s.config.role == "P")
        prefill.faults = SimFaults(status=500)
        async with sdk(proxy.url) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=2)
        assert caught.value.status_code == 502
        assert caught.value.body["message"] == "the prefill instance failed: HTTP 500"
    finally:
        await cm.__aexit__(None, None, None)


async def test_sdk_stalled_prefill_is_504():
    cm, proxy = await sim_pair("READ", max_retries=0, prefill_timeout=0.3)
    try:
        prefill = next(s for s in proxy.sims if s.config.role == "P")
        prefill.faults = SimFaults(stall_first_byte=math.inf)
        async with sdk(proxy.url) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=2)
        assert caught.value.status_code == 504
    finally:
        await cm.__aexit__(None, None, None)


async def test_sdk_over_capacity_is_rate_limit():
    cm, proxy = await sim_pair("READ", max_inflight=1)
    try:
        prefill = next(s for s in proxy.sims if s.config.role == "P")
        prefill.faults = SimFaults(stall_first_byte=2.0)
        async with sdk(proxy.url) as client:
            first = asyncio.create_task(
                client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=2)
            )
            await proxy.wait_for(lambda: prefill.stats.requests >= 1)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model="sim-model", prompt=PROMPT, max_tokens=2)
            assert caught.value.status_code == 429
            assert caught.value.response.headers["retry-after"] == "1"
            prefill.faults = SimFaults()
            completion = await first  # the request in flight was not disturbed
            assert completion.choices[0].text == expected_text(PROMPT, 2)
    finally:
        await cm.__aexit__(None, None, None)


async def test_sdk_stream_broken_after_first_byte_raises_api_error():
    """After the first byte the proxy can only end the stream with an error event; the
    SDK turns that event into an APIError (not a silent, truncated answer)."""
    cm, proxy = await sim_pair("READ", max_retries=0)
    try:
        decode = next(s for s in proxy.sims if s.config.role == "D")
        decode.faults = SimFaults(die_after_tokens=2)
        async with sdk(proxy.url) as client:
            stream = await client.completions.create(
                model="sim-model", prompt=PROMPT, max_tokens=8, stream=True
            )
            texts: list[str] = []
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    texts.extend(c.text for c in chunk.choices)
        assert "".join(texts) == expected_text(PROMPT, 2)
        assert not isinstance(caught.value, openai.APIStatusError)  # status was 200
        assert "decode" in caught.value.message
    finally:
        await cm.__aexit__(None, None, None)


# ------------------------------------------------------------------- real vLLM engines


@pytest.fixture(params=["READ", "WRITE"])
async def real(
    request: pytest.FixtureRequest, real_engines: Engines
) -> AsyncIterator[tuple[Engines, str]]:
    """Skips (or, with MORIIO_REAL_VLLM=required, fails) through ``real_engines``."""
    async with real_stack(real_engines, request.param) as stack:
        yield real_engines, stack.proxy.url


@pytest.mark.real_vllm
async def test_sdk_against_real_vllm(real: tuple[Engines, str]):
    engines, url = real
    async with sdk(url) as client, sdk(engines.decode.url) as reference:
        kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        got = await client.completions.create(**kwargs)
        want = await reference.completions.create(**kwargs)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage == want.usage
        assert got.system_fingerprint == want.system_fingerprint

        chat = {"model": "tiny", "messages": CHAT, "max_tokens": 6, "temperature": 0}
        got_chat = await client.chat.completions.create(**chat)
        want_chat = await reference.chat.completions.create(**chat)
        assert got_chat.choices[0].message.content == want_chat.choices[0].message.content

        stream = await client.chat.completions.create(
            **chat, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want_chat.choices[0].message.content
        assert chunks[-1].usage == want_chat.usage

        stream = await client.completions.create(**kwargs, stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        assert text == want.choices[0].text


@pytest.mark.real_vllm
async def test_sdk_real_vllm_errors(real: tuple[Engines, str]):
    engines, url = real
    async with sdk(url) as client, sdk(engines.decode.url) as reference:
        for kwargs in (
            {"prompt": "fox " * 600, "max_tokens": 2},
            {"prompt": PROMPT, "temperature": -1},
        ):
            with pytest.raises(openai.BadRequestError) as want:
                await reference.completions.create(model="tiny", **kwargs)
            with pytest.raises(openai.BadRequestError) as got:
                await client.completions.create(model="tiny", **kwargs)
            assert got.value.message == want.value.message
            assert got.value.body["param"] == want.value.body["param"]
