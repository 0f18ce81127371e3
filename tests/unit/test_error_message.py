"""``protocol.error_message``: the one sentence a failed call's body carries, if any.

The upstream client and ``check`` both report failed calls with it, so the shapes it knows
(vLLM's and the proxy's error body, bare strings, the proxy's /ready reason) are pinned here.
"""

from __future__ import annotations

import pytest

from moriio_proxy.protocol import error_body, error_message


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
