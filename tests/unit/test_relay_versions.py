"""The relay and vLLM 0.33's streams: kv_transfer_params removed from every chunk, the
first events held back until they show whether the answer started or failed, and error
events after the first byte reported. No sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moriio_proxy.relay import Relay, Scrubber, strip_kv_params
from moriio_proxy.upstream import UpstreamProtocolError, UpstreamStatusError

INTERNAL = (
    "___prefill_addr_host:10.0.0.1,handshake:6301,notify:61005"
    "___decode_addr_host:10.0.0.2,handshake:7301,notify:7501_" + "cd" * 16
)
KV_ERROR = {
    "error": {
        "message": "Internal server error",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
}


def event(payload: Any, compact: bool = True) -> bytes:
    text = json.dumps(payload, separators=(",", ":")) if compact else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def chunk(text: str, finish: str | None = None, kv: Any = None, chat: bool = False) -> dict:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    return {
        "id": f"cmpl-{INTERNAL}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "choices": [choice],
        "kv_transfer_params": kv,
    }


ROLE = {
    "id": f"chatcmpl-{INTERNAL}",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}],
}
DONE = b"data: [DONE]\n\n"


class Body:
    """A decode body read piece by piece."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.url = "http://10.0.0.2:8000/v1/completions"

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def relay(*pieces: bytes, endpoint: str = "completions") -> Relay:
    return Relay(Body(list(pieces)), Scrubber(INTERNAL, "pub", endpoint))  # type: ignore[arg-type]


async def relayed(r: Relay) -> bytes:
    await r.prime()
    return b"".join([part async for part in r])


def payloads(raw: bytes) -> list[Any]:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


# ------------------------------------------------------------- kv_transfer_params


@pytest.mark.parametrize("compact", [True, False])
def test_the_null_key_is_cut_out_of_each_event_of_a_block(compact: bool) -> None:
    block = event(chunk(" a"), compact) + event(chunk(" b", "length"), compact) + DONE
    stripped = strip_kv_params(block)
    assert b"kv_transfer_params" not in stripped
    assert [p["choices"][0]["text"] for p in payloads(stripped)[:2]] == [" a", " b"]
    assert stripped.endswith(DONE)
    without = {k: v for k, v in chunk(" a").items() if k != "kv_transfer_params"}
    assert payloads(stripped)[0] == without


def test_a_block_without_the_key_is_passed_as_it_is() -> None:
    block = event({"choices": [{"text": " a"}]}) + DONE
    assert strip_kv_params(block) is block


def test_a_real_value_or_an_odd_spelling_is_removed_by_parsing() -> None:
    params = {"remote_block_ids": [[1, 2]], "transfer_id": "tx-1"}
    block = event(chunk(" a")) + event(chunk(" b", "length", kv=params)) + DONE
    stripped = strip_kv_params(block)
    assert b"kv_transfer_params" not in stripped and b"remote_block_ids" not in stripped
    assert [p["choices"][0]["text"] for p in payloads(stripped)[:2]] == [" a", " b"]
    first = b'data: {"kv_transfer_params" : null,"choices":[]}\r\n\r\n'
    assert payloads(strip_kv_params(first)) == [{"choices": []}]


def test_the_words_in_generated_text_are_left_alone() -> None:
    block = event({"choices": [{"text": "kv_transfer_params"}]})
    assert strip_kv_params(block) == block
    quoted = event({"choices": [{"text": '"kv_transfer_params":null'}]})
    assert strip_kv_params(quoted) == quoted


async def test_no_chunk_of_a_033_stream_reaches_the_client_with_the_key() -> None:
    stream = event(chunk(" a")) + event(chunk(" b")) + event(chunk(" c", "length")) + DONE
    for size in (1, 9, 64, len(stream)):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        raw = await relayed(relay(*pieces))
        assert b"kv_transfer_params" not in raw and INTERNAL.encode() not in raw
        assert "".join(p["choices"][0]["text"] for p in payloads(raw)[:-1]) == " a b c"


# ------------------------------------------------------------------------ priming


async def test_chat_role_chunk_is_held_until_the_first_answer() -> None:
    r = relay(event(ROLE), event(chunk(" hi", chat=True)), DONE, endpoint="chat")
    await r.prime()
    assert len(r._pending) == 2  # the role chunk and the first content chunk
    events = payloads(b"".join([part async for part in r]))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"content": " hi"}
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("together", [True, False])
async def test_an_error_after_chats_role_chunk_fails_before_the_first_byte(
    together: bool,
) -> None:
    pieces = [event(ROLE) + event(KV_ERROR), DONE] if together else [event(ROLE), event(KV_ERROR)]
    r = relay(*pieces, endpoint="chat")
    with pytest.raises(UpstreamStatusError) as raised:
        await r.prime()
    assert raised.value.status == 500
    assert raised.value.message == "Internal server error"
    assert raised.value.payload == KV_ERROR
    assert raised.value.url.endswith("/v1/completions")


async def test_an_error_event_first_fails_before_the_first_byte_whatever_its_spacing() -> None:
    r = relay(event(KV_ERROR, compact=False) + DONE)
    with pytest.raises(UpstreamStatusError) as raised:
        await r.prime()
    assert raised.value.status == 500 and raised.value.payload == KV_ERROR
    refused = {"error": {"message": "too long", "type": "BadRequestError", "code": 400}}
    with pytest.raises(UpstreamStatusError) as raised:
        await relay(event(refused)).prime()
    assert raised.value.status == 400  # the client's fault: passed on, not retried
    with pytest.raises(UpstreamStatusError) as raised:
        await relay(event({"error": "boom"})).prime()
    assert raised.value.status == 500


async def test_keep_alive_comments_do_not_commit_the_stream() -> None:
    r = relay(b": keep-alive\n\n", b": keep-alive\n\n", event(KV_ERROR))
    with pytest.raises(UpstreamStatusError):
        await r.prime()
    r = relay(b": keep-alive\n\n", event(chunk(" a")), DONE)
    raw = await relayed(r)
    assert raw.startswith(b": keep-alive\n\n")
    assert payloads(raw)[0]["choices"][0]["text"] == " a"


async def test_a_stream_that_ends_before_answering_fails_before_the_first_byte() -> None:
    for pieces in ([], [event(ROLE)], [b": keep-alive\n\n"]):
        with pytest.raises(UpstreamProtocolError, match="ended the stream before answering"):
            await relay(*pieces, endpoint="chat").prime()


async def test_a_chunk_with_a_finish_reason_is_an_answer_not_a_role_chunk() -> None:
    done_at_once = dict(ROLE, choices=[dict(ROLE["choices"][0], finish_reason="stop")])
    r = relay(event(done_at_once), DONE, endpoint="chat")
    await r.prime()
    assert len(r._pending) == 1


# --------------------------------------------------------- errors after the first byte


async def test_an_error_after_the_first_byte_reaches_the_client_and_is_reported() -> None:
    reported: list[dict] = []
    r = relay(event(chunk(" a")), event(KV_ERROR), DONE)
    await r.prime()
    r.on_error_event = reported.append
    raw = b"".join([part async for part in r])
    assert payloads(raw)[1] == KV_ERROR and payloads(raw)[-1] == "[DONE]"
    assert reported == [KV_ERROR]


async def test_a_clean_stream_reports_no_error() -> None:
    reported: list[dict] = []
    r = relay(event(chunk(" a")), event(chunk(" error", "length")), DONE)
    await r.prime()
    r.on_error_event = reported.append
    assert payloads(b"".join([part async for part in r]))[-1] == "[DONE]"
    assert reported == []
