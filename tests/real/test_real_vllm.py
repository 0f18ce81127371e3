"""The proxy in front of real vLLM 0.32 engines (the CPU build; no KV connector).

What only a real engine shows: its OpenAI and SSE shapes, its usage accounting, its
request validation (the proxy's legs must pass it: ``min_tokens``, ``max_tokens: 1``,
``kv_transfer_params``, the X-Request-Id sandwich, ``X-data-parallel-rank``) and its 400s,
and greedy text through the proxy equal to a direct request. What it cannot show is the
KV transfer itself: see tests/real/README.md and tests/real/kv_shim.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from moriio_proxy.protocol import Instance
from tests.harness import read_sse, running_proxy
from tests.real.conftest import DECODE_KV, PREFILL_KV, Engines, Stack, shims
from tests.real.engines import REQUIRED, missing_reason

if missing_reason() is not None and not REQUIRED:
    pytest.skip(missing_reason() or "", allow_module_level=True)

pytestmark = pytest.mark.real_vllm

PREFILL_KV_ADDR = (PREFILL_KV.kv_host, PREFILL_KV.handshake_port, PREFILL_KV.notify_port)
PROMPT = "the quick brown fox jumps over the lazy dog while a prefill instance computes"
MESSAGES = [{"role": "user", "content": "tell me a story about a small model"}]
SANDWICH = re.compile(
    r"___prefill_addr_host:127\.0\.0\.1,handshake:6301,notify:6105"
    r"___decode_addr_host:127\.0\.0\.1,handshake:7301,notify:7501_[0-9a-f]{32}"
)


def leaks_internal_id(text: str) -> bool:
    return "___prefill_addr_" in text or "___decode_addr_" in text


async def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None):
    """(status, headers, parsed JSON or SSE payloads, raw text)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers or {}) as resp,
    ):
        if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = await read_sse(resp)
            return resp.status, resp.headers, events, json.dumps(events)
        raw = await resp.text()
        return resp.status, resp.headers, json.loads(raw), raw


async def direct(engines: Engines, path: str, body: dict[str, Any]) -> Any:
    """The same request straight to the decode engine: the reference answer."""
    status, _, payload, _ = await post(engines.decode.url + path, body)
    assert status == 200, payload
    return payload


def stream_text(events: list[Any]) -> str:
    out = []
    for chunk in events[:-1]:
        for choice in chunk["choices"]:
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def check_usage(usage: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == completion_tokens
    assert usage["total_tokens"] == prompt_tokens + completion_tokens


def check_legs(stack: Stack, max_tokens: int | None) -> None:
    """The real engines accepted both legs of the last request, as the proxy built them."""
    prefill = stack.prefill_shim.generation_legs()[-1]
    decode = stack.decode_shim.generation_legs()[-1]
    # The prefill leg passed vLLM's validation and ran as a one-token request.
    assert prefill.status == 200, prefill.response
    body = prefill.body
    assert body["max_tokens"] == 1 and body["min_tokens"] == 1 and body["stream"] is False
    assert "stream_options" not in body  # vLLM 400s on stream_options without stream
    params = body["kv_transfer_params"]
    assert params["do_remote_decode"] is True and params["do_remote_prefill"] is False
    assert params["transfer_id"].startswith("tx-")
    assert (params["remote_host"], params["remote_handshake_port"]) == DECODE_KV[:2]
    assert prefill.response["usage"]["completion_tokens"] == 1
    assert prefill.response["choices"][0]["finish_reason"] == "length"
    # vLLM adopted the sandwich as its request id (the connector parses it from there).
    request_id = prefill.headers["X-Request-Id"]
    assert SANDWICH.fullmatch(request_id), request_id
    assert prefill.response["id"].endswith("-" + request_id)
    # DP 2: the proxy named a rank and vLLM (which 400s an out-of-range one) took it.
    assert prefill.headers["X-data-parallel-rank"] in ("0", "1")
    assert prefill.filled is not None  # the shim stood in for the connector
    # The decode leg: the client's body, same id, no decrement, the mode's params.
    assert decode.status == 200, decode.response
    assert decode.headers["X-Request-Id"] == request_id
    assert decode.body.get("max_tokens") == max_tokens
    dparams = decode.body["kv_transfer_params"]
    assert dparams["do_remote_prefill"] is True and dparams["do_remote_decode"] is False
    assert dparams["transfer_id"] == params["transfer_id"]
    assert dparams["remote_host"] == PREFILL_KV.kv_host
    if stack.mode == "READ":
        # P's params forwarded as returned: nested block ids, string ports, rank.
        for key, value in prefill.filled.items():
            if key not in ("do_remote_prefill", "do_remote_decode"):
                assert dparams[key] == value, key
        assert isinstance(dparams["remote_block_ids"][0], list)
    else:
        assert dparams["remote_block_ids"] is None and dparams["remote_engine_id"] is None
        assert dparams["remote_dp_rank"] == int(prefill.headers["X-data-parallel-rank"])
        assert dparams.get("remote_dp_rank_override") is not True


# ----------------------------------------------------------------------- completions


async def test_completion_equals_direct_greedy(stack: Stack):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    status, headers, payload, raw = await post(
        stack.proxy.url + "/v1/completions", body, {"X-Request-Id": "client-42"}
    )
    assert status == 200, payload
    reference = await direct(stack.engines, "/v1/completions", body)
    assert headers["X-Request-Id"] == "client-42"
    assert payload["id"] == "cmpl-client-42"
    assert not leaks_internal_id(raw)
    assert "kv_transfer_params" not in payload
    assert payload["object"] == "text_completion" and payload["model"] == "tiny"
    (choice,) = payload["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == reference["choices"][0]["text"] and choice["text"].strip()
    check_usage(payload["usage"], reference["usage"]["prompt_tokens"], 16)
    check_legs(stack, max_tokens=16)


async def test_completion_streaming_equals_direct_greedy(stack: Stack):
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, events, raw = await post(stack.proxy.url + "/v1/completions", body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    reference = await direct(stack.engines, "/v1/completions", body)
    assert events[-1] == "[DONE]" and reference[-1] == "[DONE]"
    assert not leaks_internal_id(raw)
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert stream_text(events) == stream_text(reference)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    # include_usage: one last chunk with no choices and the usage of the whole answer.
    assert chunks[-1]["choices"] == [] and all("usage" not in c for c in chunks[:-1])
    check_usage(chunks[-1]["usage"], reference[-2]["usage"]["prompt_tokens"], 12)
    # Non-streaming, the same greedy text.
    plain = dict(body, stream=False)
    plain.pop("stream_options")
    once = await direct(stack.engines, "/v1/completions", plain)
    assert stream_text(events) == once["choices"][0]["text"]
    check_legs(stack, max_tokens=12)


async def test_max_tokens_one(stack: Stack):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    status, _, payload, _ = await post(stack.proxy.url + "/v1/completions", body)
    assert status == 200, payload
    reference = await direct(stack.engines, "/v1/completions", body)
    assert payload["choices"][0]["text"] == reference["choices"][0]["text"]
    check_usage(payload["usage"], reference["usage"]["prompt_tokens"], 1)
    check_legs(stack, max_tokens=1)  # the decode leg kept max_tokens 1 (no decrement)


async def test_stop_string_applies_on_decode_only(stack: Stack):
    """``stop`` is dropped from the prefill leg (P's token is discarded; a stop there
    would end it without KV) and kept on the decode leg, where the real engine applies it."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    free = (await direct(stack.engines, "/v1/completions", body))["choices"][0]["text"]
    stop = free[6:9]
    assert stop.strip() and free.index(stop) == 6, free
    body["stop"] = [stop]
    reference = await direct(stack.engines, "/v1/completions", body)
    assert reference["choices"][0]["finish_reason"] == "stop"
    status, _, payload, _ = await post(stack.proxy.url + "/v1/completions", body)
    assert status == 200, payload
    assert payload["choices"][0]["text"] == reference["choices"][0]["text"] == free[:6]
    assert payload["choices"][0]["finish_reason"] == "stop"
    assert payload["choices"][0]["stop_reason"] == stop
    assert "stop" not in stack.prefill_shim.generation_legs()[-1].body
    assert stack.decode_shim.generation_legs()[-1].body["stop"] == [stop]


# ------------------------------------------------------------------------------ chat


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
async def test_chat_equals_direct_greedy(stack: Stack, limit: str):
    body = {"model": "tiny", "messages": MESSAGES, limit: 10, "temperature": 0}
    status, _, payload, raw = await post(stack.proxy.url + "/v1/chat/completions", body)
    assert status == 200, payload
    reference = await direct(stack.engines, "/v1/chat/completions", body)
    assert payload["object"] == "chat.completion"
    assert payload["id"].startswith("chatcmpl-") and not leaks_internal_id(raw)
    (choice,) = payload["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert choice["finish_reason"] == "length"
    check_usage(payload["usage"], reference["usage"]["prompt_tokens"], 10)
    check_legs(stack, max_tokens=10 if limit == "max_tokens" else None)
    assert stack.decode_shim.generation_legs()[-1].body[limit] == 10
    assert stack.prefill_shim.generation_legs()[-1].body[limit] == 1


async def test_chat_streaming_equals_direct_greedy(stack: Stack):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, _, events, raw = await post(stack.proxy.url + "/v1/chat/completions", body)
    assert status == 200
    reference = await direct(stack.engines, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]" and not leaks_internal_id(raw)
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text(events) == stream_text(reference)
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "length"
    check_usage(chunks[-1]["usage"], reference[-2]["usage"]["prompt_tokens"], 8)
    check_legs(stack, max_tokens=8)


async def test_chat_without_max_tokens(stack: Stack):
    """vLLM then generates up to max-model-len; the prefill leg still gets its one token."""
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0}
    status, _, payload, _ = await post(stack.proxy.url + "/v1/chat/completions", body)
    assert status == 200, payload
    reference = await direct(stack.engines, "/v1/chat/completions", body)
    assert (
        payload["choices"][0]["message"]["content"]
        == (reference["choices"][0]["message"]["content"])
    )
    prompt_tokens = reference["usage"]["prompt_tokens"]
    check_usage(payload["usage"], prompt_tokens, stack.engines.max_model_len - prompt_tokens)
    check_legs(stack, max_tokens=None)


# ---------------------------------------------------------------------------- errors


async def engine_error(engines: Engines, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, _, payload, _ = await post(engines.decode.url + path, body)
    assert status == 400, payload
    return payload["error"]


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("prompt too long", {"prompt": "fox " * 600, "max_tokens": 4}),
        ("prompt too long, streaming", {"prompt": "fox " * 600, "stream": True}),
        ("negative temperature", {"prompt": PROMPT, "temperature": -1}),
        ("bad logprobs", {"prompt": PROMPT, "logprobs": -3}),
    ],
)
async def test_engine_400_reaches_the_client(stack: Stack, case: str, body: dict[str, Any]):
    body = {"model": "tiny", **body}
    expected = await engine_error(stack.engines, "/v1/completions", body)
    status, _, payload, raw = await post(stack.proxy.url + "/v1/completions", body)
    assert status == 400, (case, payload)
    error = payload["error"]
    assert error["message"] == expected["message"], case
    assert error["code"] == 400
    assert not leaks_internal_id(raw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_what_only_the_decode_leg_would_refuse_is_refused_before_any_leg(
    stack: Stack, body: dict[str, Any], param: str
):
    """The prefill leg (one token, no stream options) would pass these and, with a real
    READ-mode connector, leave KV on P until defer_timeout; the engine 400s them too."""
    body = {"model": "tiny", **body}
    await engine_error(stack.engines, "/v1/completions", body)
    sent = len(stack.prefill_shim.exchanges) + len(stack.decode_shim.exchanges)
    status, _, payload, _ = await post(stack.proxy.url + "/v1/completions", body)
    assert status == 400
    assert payload["error"]["param"] == param
    assert len(stack.prefill_shim.exchanges) + len(stack.decode_shim.exchanges) == sent


async def test_chat_400_reaches_the_client(stack: Stack):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "top_p": 7}
    expected = await engine_error(stack.engines, "/v1/chat/completions", body)
    status, _, payload, _ = await post(stack.proxy.url + "/v1/chat/completions", body)
    assert status == 400
    assert payload["error"]["message"] == expected["message"]


# ----------------------------------------------------------------------- the surface


async def test_models_and_ready(stack: Stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.proxy.url + "/v1/models") as resp:
            assert resp.status == 200
            models = await resp.json()
        async with session.get(stack.proxy.url + "/ready") as resp:
            assert resp.status == 200
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == stack.engines.max_model_len


async def test_concurrent_requests_equal_direct_greedy(stack: Stack):
    """Real batching on both engines, both prefill DP ranks in use."""
    prompts = [f"{PROMPT} {word}" for word in ("one", "two", "three", "four", "five", "six")]
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
    answers = await asyncio.gather(*(post(stack.proxy.url + "/v1/completions", b) for b in bodies))
    for body, (status, _, payload, _) in zip(bodies, answers, strict=True):
        assert status == 200, payload
        reference = await direct(stack.engines, "/v1/completions", body)
        assert payload["choices"][0]["text"] == reference["choices"][0]["text"]
    legs = stack.prefill_shim.generation_legs()
    assert all(leg.status == 200 for leg in legs)
    assert all(leg.status == 200 for leg in stack.decode_shim.generation_legs())
    assert {leg.headers["X-data-parallel-rank"] for leg in legs} == {"0", "1"}


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_registration_by_heartbeat(real_engines: Engines, mode: str):
    """Registered as vLLM 0.32's heartbeat child does it (docs/protocol.md §2.1), not by
    static config: a msgpack map from a DEALER every 0.2 s."""
    async with shims(real_engines) as (prefill, decode), running_proxy() as proxy:
        beats = [
            {
                "type": "P",
                "http_address": prefill.address,
                "zmq_address": "host:127.0.0.1,handshake:6301,notify:6105",
                "dp_size": PREFILL_KV.dp_size,
                "tp_size": 1,
                "transfer_mode": mode,
            },
            {
                "type": "D",
                "http_address": decode.address,
                "zmq_address": "host:127.0.0.1,handshake:7301,notify:7501",
                "dp_size": 1,
                "tp_size": 1,
                "transfer_mode": mode,
            },
        ]
        ctx = zmq.asyncio.Context()
        dealers = []
        for _ in beats:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://{proxy.discovery}")
            dealers.append(dealer)

        async def beat() -> None:
            while True:
                for dealer, message in zip(dealers, beats, strict=True):
                    await dealer.send(msgpack.packb(message))
                await asyncio.sleep(0.2)

        task = asyncio.create_task(beat())
        try:
            await proxy.wait_registered(1, 1)
            # The proxy asked each one's GET /version (through the shim, from the engine).
            assert {e.vllm_version for e in proxy.state.registry.entries()} == {"0.32.0"}
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            status, _, payload, _ = await post(proxy.url + "/v1/completions", body)
            assert status == 200, payload
            reference = await direct(real_engines, "/v1/completions", body)
            assert payload["choices"][0]["text"] == reference["choices"][0]["text"]
            assert decode.generation_legs()[-1].status == 200
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for dealer in dealers:
                dealer.close()
            ctx.term()


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_connector_less_prefill_is_refused_without_the_shim(real_engines: Engines, mode: str):
    """Why the shim exists: a real prefill engine without MoRIIOConnector answers the leg
    with ``kv_transfer_params: null`` and finish_reason "length", and the proxy refuses to
    turn that into an answer (on a real READ pair it would be a decode without KV)."""
    p, d = real_engines.prefill, real_engines.decode
    statics = [
        Instance("P", f"127.0.0.1:{p.port}", *PREFILL_KV_ADDR, PREFILL_KV.dp_size, 1, mode),
        Instance("D", f"127.0.0.1:{d.port}", *DECODE_KV, 1, 1, mode),
    ]
    async with running_proxy(static_instances=statics, max_retries=0) as proxy:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        status, _, payload, _ = await post(proxy.url + "/v1/completions", body)
        assert status == 502, payload
        assert "no kv_transfer_params" in payload["error"]["message"]
        # max_tokens 1: the prefill engine's one token is the whole answer.
        body["max_tokens"] = 1
        status, _, payload, _ = await post(proxy.url + "/v1/completions", body)
        assert status == 200, payload
        reference = await direct(real_engines, "/v1/completions", body)
        assert payload["choices"][0]["text"] == reference["choices"][0]["text"]
