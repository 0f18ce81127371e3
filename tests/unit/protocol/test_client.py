"""``protocol.client``: a client's body checked into a ClientRequest, refused with vLLM's
param name for anything a decode engine would refuse, before any leg is sent.
"""

from __future__ import annotations

import pytest

from moriio_proxy.protocol import (
    RequestError,
    parse_client_request,
)
from tests.harness.wire import chat_body, completion_body


def test_single_string_prompt_is_accepted():
    request = parse_client_request("completions", completion_body())
    assert request.endpoint == "completions"
    assert request.stream is True
    assert request.include_usage is True
    assert request.model == "m"


@pytest.mark.parametrize("prompt", [[1, 2, 3], ["one prompt"], [[1, 2, 3]]])
def test_one_prompt_in_list_form_is_accepted(prompt):
    request = parse_client_request("completions", {"prompt": prompt})
    assert request.body["prompt"] == prompt
    assert request.stream is False
    assert request.include_usage is False
    assert request.model is None


@pytest.mark.parametrize(
    "prompt", [["a", "b"], [[1, 2], [3, 4]], [1, "a"], [], 42, None, [True, False]]
)
def test_multi_or_bad_prompts_are_refused(prompt):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": prompt})
    assert info.value.param == "prompt"


def test_missing_prompt_is_refused():
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"model": "m"})
    assert info.value.param == "prompt"


@pytest.mark.parametrize("n", [2, 0, True, 1.0, "1"])
def test_n_other_than_one_is_refused(n):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": "x", "n": n})
    assert info.value.param == "n"


@pytest.mark.parametrize("n", [1, None])
def test_n_one_is_accepted(n):
    assert parse_client_request("chat", chat_body(n=n)).endpoint == "chat"


@pytest.mark.parametrize("messages", ["missing", None, [], "hi", {"role": "user"}])
def test_chat_needs_a_non_empty_messages_list(messages):
    body = chat_body()
    if messages == "missing":
        del body["messages"]
    else:
        body["messages"] = messages
    with pytest.raises(RequestError) as info:
        parse_client_request("chat", body)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"stream": "yes"}, "stream"), ({"stream_options": "usage"}, "stream_options")],
)
def test_bad_stream_fields_are_refused(extra, param):
    with pytest.raises(RequestError) as info:
        parse_client_request("completions", {"prompt": "x", **extra})
    assert info.value.param == param


@pytest.mark.parametrize("body", [[{"prompt": "x"}], "x", None])
def test_non_object_body_is_refused(body):
    with pytest.raises(RequestError):
        parse_client_request("completions", body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "8"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"prompt": "a", "stream": False, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
    ],
)
def test_requests_a_decode_engine_would_refuse_are_refused_before_any_leg(body, param):
    # The prefill leg (one token, no stream options) would pass these, and in READ mode
    # its KV blocks would then wait on P for defer_timeout.
    with pytest.raises(RequestError) as err:
        parse_client_request("completions", body)
    assert err.value.param == param


def test_empty_stream_options_without_stream_are_accepted_as_vllm_does():
    parse_client_request("completions", {"prompt": "a", "stream_options": {}})
    parse_client_request("completions", {"prompt": "a", "max_tokens": None})
