"""``protocol.answers``: what the proxy writes itself: ids rewritten for the client, a
prefill's answer as the client's, errors in vLLM's shape; and ``error_message``, the one
sentence a failed call's body carries: the upstream client and ``check`` both report failed
calls with it, so the shapes it knows (vLLM's and the proxy's error body, bare strings, the
proxy's /ready reason) are pinned here.
"""

from __future__ import annotations

import pytest

from moriio_proxy.protocol import (
    error_body,
    error_message,
    new_request_id,
    prefill_as_answer,
    rewrite_id,
)
from tests.harness.wire import NONCE, P_RETURNED, D, P


def test_rewrite_id_replaces_id_and_drops_internal_params():
    payload = {
        "id": "cmpl-" + new_request_id(P, D, NONCE),
        "kv_transfer_params": P_RETURNED,
        "x": 1,
    }
    assert rewrite_id(payload, "cmpl-public") == {"id": "cmpl-public", "x": 1}


# --------------------------------------------------------------------- prefill answers

USAGE = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}


def completion_payload():
    return {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 123,
        "model": "m",
        "choices": [
            {"index": 0, "text": "!", "finish_reason": "stop", "stop_reason": 2, "logprobs": None}
        ],
        "usage": USAGE,
        "kv_transfer_params": None,
    }


def chat_payload():
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 123,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Yes"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "kv_transfer_params": None,
    }


def test_prefill_as_answer_completions_without_usage():
    chunks = prefill_as_answer(completion_payload(), "completions", include_usage=False)
    assert chunks == [
        {
            "id": "cmpl-x",
            "created": 123,
            "model": "m",
            "object": "text_completion",
            "choices": [
                {
                    "index": 0,
                    "text": "!",
                    "finish_reason": "stop",
                    "logprobs": None,
                    "stop_reason": 2,
                }
            ],
        }
    ]


def test_prefill_as_answer_completions_with_usage():
    chunks = prefill_as_answer(completion_payload(), "completions", include_usage=True)
    assert len(chunks) == 2
    assert chunks[0]["choices"][0]["text"] == "!"
    assert "usage" not in chunks[0]
    assert chunks[1]["choices"] == []
    assert chunks[1]["usage"] == USAGE
    assert chunks[1]["object"] == "text_completion"
    assert all("kv_transfer_params" not in c for c in chunks)


def test_prefill_as_answer_chat_without_usage():
    chunks = prefill_as_answer(chat_payload(), "chat", include_usage=False)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 2
    assert all(c["id"] == "chatcmpl-x" and c["model"] == "m" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[1]["choices"][0]
    assert last["delta"] == {"content": "Yes"}
    assert last["finish_reason"] == "stop"
    assert last["index"] == 0
    assert all("usage" not in c for c in chunks)


def test_prefill_as_answer_chat_with_usage():
    chunks = prefill_as_answer(chat_payload(), "chat", include_usage=True)
    assert len(chunks) == 3
    assert chunks[-1]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "Yes"


def test_prefill_as_answer_without_usage_in_payload_adds_no_usage_chunk():
    payload = completion_payload()
    del payload["usage"]
    assert len(prefill_as_answer(payload, "completions", include_usage=True)) == 1


# -------------------------------------------------------------------------- errors


def test_error_body_has_vllms_shape():
    assert error_body("bad prompt", 400, param="prompt") == {
        "error": {
            "message": "bad prompt",
            "type": "BadRequestError",
            "param": "prompt",
            "code": 400,
        }
    }
    body = error_body("no instances", 503)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == 503
    assert isinstance(body["error"]["code"], int)
    assert body["error"]["param"] is None
    assert body["error"]["message"] == "no instances"
    assert error_body("x", 502, err_type="Custom")["error"]["type"] == "Custom"


# -------------------------------------------------------------------- error_message


def test_reads_the_proxys_and_vllms_error_body() -> None:
    assert error_message(error_body("no instance is registered", 503)) == (
        "no instance is registered"
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"error": "engine dead"}, "engine dead"),
        ({"message": "model not found"}, "model not found"),
        ({"status": "not ready", "reason": "draining"}, "draining"),
        # The structured error wins over a sibling message or reason.
        ({"error": {"message": "first"}, "message": "second", "reason": "third"}, "first"),
        ({"message": "second", "reason": "third"}, "second"),
    ],
)
def test_reads_the_other_shapes_servers_send(payload: object, expected: str) -> None:
    assert error_message(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "plain text",
        ["error"],
        {},
        {"error": {"code": 500}},
        {"error": {"message": 42}},
        {"error": 500, "message": None, "reason": ["x"]},
        {"detail": "FastAPI's shape is not one of ours"},
    ],
)
def test_none_when_there_is_no_sentence(payload: object) -> None:
    assert error_message(payload) is None
