"""The simulated OpenAI server as a client sees it (no proxy): vLLM 0.32's answer shapes,
streaming, chat, stop strings, its 400s and 404s, the DP-rank header, ``n`` and prompts."""

from __future__ import annotations

import aiohttp

from moriio_proxy.sim import chat_prompt_text, expected_text
from tests.harness.legs import PROMPT, post, post_sse, sim, words
from tests.harness.waiting import eventually


async def test_plain_completion_exact_tokens_and_usage(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        status, body = await post(
            http, p, {"prompt": PROMPT, "max_tokens": 7}, {"X-Request-Id": "abc"}
        )
    assert status == 200
    assert body["id"] == "cmpl-abc"
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == expected_text(PROMPT, 7)
    assert len(words(choice["text"])) == 7
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    n_prompt = len(words(PROMPT))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == n_prompt + 7
    assert body["kv_transfer_params"] is None
    assert p.stats.requests == 1 and p.stats.completed == 1


async def test_default_max_tokens_token_ids_prompt_and_random_id(
    http: aiohttp.ClientSession,
) -> None:
    async with sim("P", default_max_tokens=5) as p:
        status, body = await post(http, p, {"prompt": [11, 22, 33]})
        assert status == 200
        assert body["choices"][0]["text"] == expected_text("11 22 33", 5)
        assert body["id"].startswith("cmpl-") and len(body["id"]) > len("cmpl-")
        _, body2 = await post(http, p, {"prompt": ["11 22 33"], "max_tokens": 5})
        assert body2["choices"][0]["text"] == body["choices"][0]["text"]


async def test_streaming_equals_non_streaming(http: aiohttp.ClientSession) -> None:
    async with sim("P", token_latency=0.001) as p:
        _, full = await post(http, p, {"prompt": PROMPT, "max_tokens": 6})
        status, events = await post_sse(
            http,
            p,
            {
                "prompt": PROMPT,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            {"X-Request-Id": "sid"},
        )
    assert status == 200
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6
    token_chunks = events[:-2]
    assert len(token_chunks) == 6
    assert all(c["id"] == "cmpl-sid" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 5 + ["length"]


async def test_chat_plain_and_streaming(http: aiohttp.ClientSession) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with sim("P") as p:
        status, body = await post(
            http,
            p,
            {"messages": messages, "max_completion_tokens": 4, "max_tokens": 9},
            {"X-Request-Id": "c1"},
            path="/v1/chat/completions",
        )
        assert status == 200
        assert body["id"] == "chatcmpl-c1"
        assert body["object"] == "chat.completion"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant"
        assert msg["content"] == expected_text(chat_prompt_text(messages), 4)
        _, events = await post_sse(
            http,
            p,
            {"messages": messages, "max_tokens": 4, "stream": True},
            {"X-Request-Id": "c2"},
            path="/v1/chat/completions",
        )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-c2" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert content == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stop_string_truncates(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        full = expected_text(PROMPT, 8)
        stop_word = full.split()[3]
        status, body = await post(http, p, {"prompt": PROMPT, "max_tokens": 8, "stop": [stop_word]})
        _, events = await post_sse(
            http, p, {"prompt": PROMPT, "max_tokens": 8, "stop": stop_word, "stream": True}
        )
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop_word
    assert choice["text"] == full[: full.index(stop_word)]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]


async def test_bad_requests(http: aiohttp.ClientSession) -> None:
    async with sim("P", max_model_len=20) as p:
        async with http.post(p.url + "/v1/completions", data=b"{nope") as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["type"] == "BadRequestError" and err["code"] == 400
        status, body = await post(http, p, {"max_tokens": 3})
        assert status == 400
        status, body = await post(http, p, {"max_tokens": 3}, path="/v1/chat/completions")
        assert status == 400
        status, body = await post(
            http, p, {"prompt": PROMPT, "stream_options": {"include_usage": True}}
        )
        assert status == 400
        assert body["error"]["message"] == "Stream options can only be defined when `stream=True`."
        status, _ = await post(http, p, {"prompt": " ".join(["w"] * 21)})
        assert status == 400
        # prompt + max_tokens > max_model_len is clamped by 0.32's get_max_tokens, not refused
        status, body = await post(http, p, {"prompt": " ".join(["w"] * 18), "max_tokens": 10})
        assert status == 200
        assert body["usage"]["completion_tokens"] == 2
        status, _ = await post(http, p, {"prompt": PROMPT, "max_tokens": 1, "min_tokens": 2})
        assert status == 400
        assert p.stats.errors_4xx == 6


async def test_data_parallel_rank_header(http: aiohttp.ClientSession) -> None:
    async with sim("P", dp_size=2) as p:
        status, body = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "2"})
        assert status == 400
        assert "out of range" in body["error"]["message"]
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "-1"})
        assert status == 400
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "one"})
        assert status == 200  # a non-integer header is ignored
        status, _ = await post(http, p, {"prompt": PROMPT}, {"X-data-parallel-rank": "1"})
        assert status == 200
        assert p.legs[-1].dp_rank == 1
        assert sum(p.stats.per_rank.values()) == 2


async def test_models_and_health(http: aiohttp.ClientSession) -> None:
    async with sim("D", model="m1") as d:
        async with http.get(d.url + "/v1/models") as r:
            body = await r.json()
        assert body["object"] == "list" and body["data"][0]["id"] == "m1"
        async with http.get(d.url + "/health") as r:
            assert r.status == 200
        status, body = await post(http, d, {"prompt": PROMPT, "model": "other"})
        assert status == 404


async def test_multi_prompt_and_n(http: aiohttp.ClientSession) -> None:
    async with sim("P") as p:
        _, body = await post(http, p, {"prompt": ["a b c", "d e"], "max_tokens": 3, "n": 2})
        texts = {c["index"]: c["text"] for c in body["choices"]}
        assert texts == {
            0: expected_text("a b c", 3),
            1: expected_text("a b c", 3),
            2: expected_text("d e", 3),
            3: expected_text("d e", 3),
        }
        assert body["usage"] == {
            "prompt_tokens": 5,
            "total_tokens": 17,
            "completion_tokens": 12,
            "prompt_tokens_details": None,
        }
        status, _ = await post(http, p, {"prompt": "a", "n": 2, "temperature": 0})
        assert status == 400


async def test_client_disconnect_mid_stream_is_recorded(http: aiohttp.ClientSession) -> None:
    async with sim("P", token_latency=0.02) as p:
        async with http.post(
            p.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True}
        ) as r:
            await r.content.readline()
            r.close()
        await eventually(lambda: p.stats.cancelled)
        assert p.stats.cancelled == 1
        assert p.legs[-1].cancelled and not p.legs[-1].finished
