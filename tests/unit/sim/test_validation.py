"""vLLM 0.32's request validation and the split into engine requests (pure: no server)."""

from __future__ import annotations

from typing import Any

import pytest

from moriio_proxy.sim import LegRecord, SimConfig
from moriio_proxy.sim.api.errors import BadRequest, error_type
from moriio_proxy.sim.api.validation import parse_request, split

CONFIG = SimConfig(role="D", dp_size=2, max_model_len=20, default_max_tokens=5)


def parse(body: Any, chat: bool = False, **headers: str) -> Any:
    return parse_request(body, chat, headers, CONFIG)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ([1], 400, "JSON object"),
        ({"prompt": "a", "model": "other"}, 404, "does not exist"),
        ({"prompt": "a", "stream": "yes"}, 400, "boolean"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream=True"),
        ({"prompt": "a", "kv_transfer_params": [1]}, 400, "kv_transfer_params"),
        ({}, 400, "prompt"),
        ({"prompt": [1.5]}, 400, "prompt"),
        ({"prompt": "  "}, 400, "cannot be empty"),
        ({"prompt": "w " * 21}, 400, "maximum context length is 20"),
        ({"prompt": "w " * 20}, 400, "plus the number of requested output tokens"),
        ({"prompt": "a", "n": 0}, 400, "n must be at least 1"),
        ({"prompt": "a", "n": 2, "temperature": 0}, 400, "greedy"),
        ({"prompt": "a", "max_tokens": "3"}, 400, "must be an integer"),
        ({"prompt": "a", "max_tokens": 21}, 400, "max_model_len=20"),
        ({"prompt": "a", "max_tokens": 0}, 400, "at least 1"),
        ({"prompt": "a", "min_tokens": -1}, 400, "min_tokens"),
        ({"prompt": "a", "stop": [1]}, 400, "stop"),
        ({"prompt": "a", "max_tokens": 1, "min_tokens": 2}, 400, "max_tokens=1"),
        ({"prompt": "a", "kv_transfer_params": {"prompt_token_ids": [-1]}}, 400, "token_ids"),
    ],
)
def test_refusals(body: Any, status: int, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment) as err:
        parse(body)
    assert err.value.status == status


def test_prompt_forms_and_defaults() -> None:
    assert parse({"prompt": " a  b "}).prompts == [["a", "b"]]
    assert parse({"prompt": ["a b", "c"]}).prompts == [["a", "b"], ["c"]]
    assert parse({"prompt": [1, 2]}).prompts == [["1", "2"]]
    assert parse({"prompt": [[1], [2, 3]]}).prompts == [["1"], ["2", "3"]]
    parsed = parse({"prompt": "a b"})
    assert parsed.max_tokens == [5] and parsed.n == 1 and parsed.dp_rank is None
    assert parsed.spec.resp_id.startswith("cmpl-") and not parsed.spec.stream


def test_chat_prompt_and_max_completion_tokens() -> None:
    messages = [{"role": "user", "content": "hi there"}]
    parsed = parse({"messages": messages, "max_completion_tokens": 3, "max_tokens": 9}, chat=True)
    assert parsed.prompts == [["user:", "hi", "there"]] and parsed.max_tokens == [3]
    with pytest.raises(BadRequest, match="messages"):
        parse({"messages": []}, chat=True)


def test_max_tokens_is_clamped_to_the_context_left() -> None:
    parsed = parse({"prompt": ["w " * 18, "w"], "max_tokens": 10})
    assert parsed.max_tokens == [2, 10]


def test_decode_reuses_the_prefills_token_ids() -> None:
    body = {"prompt": "ignored text", "kv_transfer_params": {"prompt_token_ids": [7, 8], "x": 1}}
    parsed = parse(body)
    assert parsed.prompts == [["7", "8"]] and parsed.kv == {"x": 1}
    assert body["kv_transfer_params"] == {"prompt_token_ids": [7, 8], "x": 1}  # not mutated
    echoed = parse(dict(body, echo=True))
    assert echoed.prompts == [["ignored", "text"]] and echoed.kv == {"x": 1}


def test_stream_usage_options_and_request_id() -> None:
    parsed = parse(
        {
            "prompt": "a",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        **{"X-Request-Id": "abc"},
    )
    spec = parsed.spec
    assert spec.stream and spec.include_usage and spec.continuous_usage
    assert spec.resp_id == "cmpl-abc"
    assert parse({"messages": [{"role": "u"}]}, True, **{"X-Request-Id": "x"}).spec.resp_id == (
        "chatcmpl-x"
    )


def test_data_parallel_rank_header() -> None:
    assert parse({"prompt": "a"}, **{"X-data-parallel-rank": "1"}).dp_rank == 1
    assert parse({"prompt": "a"}, **{"X-data-parallel-rank": "one"}).dp_rank is None
    with pytest.raises(BadRequest, match="out of range"):
        parse({"prompt": "a"}, **{"X-data-parallel-rank": "2"})


def test_split_per_prompt_and_n_with_own_kv_copies() -> None:
    body = {"prompt": ["a b", "c"], "n": 2, "kv_transfer_params": {"k": [1]}}
    parsed = parse(body, **{"X-Request-Id": "rid"})
    rec = LegRecord(path="/v1/completions", headers={})
    ranks = iter(range(100))
    reqs = split(parsed, rec, lambda: next(ranks))
    assert [(r.index, r.prompt_idx, r.rank) for r in reqs] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 2),
        (3, 1, 3),
    ]
    assert reqs[0].engine_id.startswith("0_cmpl-rid-0-")
    assert reqs[3].engine_id.startswith("1_cmpl-rid-1-")
    assert len({r.engine_id for r in reqs}) == 4
    reqs[0].kv["k"].append(2)  # type: ignore[index]
    assert reqs[1].kv == {"k": [1]} and parsed.kv == {"k": [1]}
    assert all(r.rec is rec and r.text == ("a b" if r.prompt_idx == 0 else "c") for r in reqs)


def test_split_pins_a_requested_rank_and_keeps_a_single_chat_id() -> None:
    parsed = parse({"messages": [{"role": "u", "content": "x"}]}, True, **{"X-Request-Id": "c"})
    reqs = split(parsed, LegRecord(path="/", headers={}), lambda: 1)
    assert reqs[0].engine_id.startswith("chatcmpl-c-") and reqs[0].rank == 1
    pinned = parse({"prompt": "a"}, **{"X-data-parallel-rank": "0"})
    assert split(pinned, LegRecord(path="/", headers={}), lambda: 1)[0].rank == 0


def test_error_types_follow_the_status_phrase() -> None:
    assert error_type(503) == "ServiceUnavailableError"
    assert error_type(429) == "TooManyRequestsError"
    assert error_type(500) == "InternalServerError"
    assert error_type(404) == "NotFoundError"
    assert error_type(599) == "InternalServerError" and error_type(499) == "BadRequestError"
