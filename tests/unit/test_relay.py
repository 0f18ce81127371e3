"""The decode stream relay: whole events out, internal id scrubbed, clean end or error."""

from __future__ import annotations

import json

from moriio_proxy.relay import Relay, Scrubber
from moriio_proxy.upstream import UpstreamTimeout

INTERNAL = (
    "___prefill_addr_host:10.0.0.1,handshake:6301,notify:61005"
    "___decode_addr_host:10.0.0.2,handshake:7301,notify:7501_" + "ab" * 16
)


def sse(text: str) -> bytes:
    body = {"id": f"cmpl-{INTERNAL}", "choices": [{"index": 0, "text": text}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class pieces:
    """A decode body that arrives ``size`` bytes at a time, then ends or fails."""

    def __init__(self, data: bytes, size: int, error: Exception | None = None) -> None:
        self._parts = [data[i : i + size] for i in range(0, len(data), size)]
        self._error = error

    async def read(self) -> bytes:
        if self._parts:
            return self._parts.pop(0)
        if self._error is not None:
            raise self._error
        return b""


async def collect(relay: Relay) -> bytes:
    return b"".join([part async for part in relay])


def payloads(raw: bytes) -> list:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_id_split_across_chunks_is_still_scrubbed():
    stream = sse(" a") + sse(" b") + b"data: [DONE]\n\n"
    closed = []
    for size in (1, 7, 50, len(stream)):
        relay = Relay(pieces(stream, size), Scrubber(INTERNAL, "pub", "completions"))
        relay.add_close_callback(lambda: closed.append(True))
        raw = await collect(relay)
        assert INTERNAL.encode() not in raw
        events = payloads(raw)
        assert events[-1] == "[DONE]"
        assert [e["id"] for e in events[:-1]] == ["cmpl-pub", "cmpl-pub"]
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " a b"
        assert relay.saw_done
    assert len(closed) == 4  # upstream released once per stream


async def test_stream_that_ends_without_done_gets_an_error_event():
    relay = Relay(pieces(sse(" a"), 5), Scrubber(INTERNAL, "pub", "completions"))
    events = payloads(await collect(relay))
    assert events[0]["choices"][0]["text"] == " a"
    assert events[1]["error"]["code"] == 502
    assert events[-1] == "[DONE]"
    assert not relay.saw_done


async def test_idle_timeout_mid_stream_becomes_a_504_event():
    error = UpstreamTimeout("10.0.0.2:40005 sent nothing for 1s mid-stream")
    relay = Relay(pieces(sse(" a"), 100, error), Scrubber(INTERNAL, "pub", "completions"))
    raw = await collect(relay)
    events = payloads(raw)
    assert events[1]["error"]["code"] == 504
    assert "10.0.0.2" not in raw.decode()  # internal addresses stay in the log
    assert events[-1] == "[DONE]"


async def test_close_before_iteration_releases_upstream():
    released = []
    relay = Relay(pieces(sse(" a"), 100), Scrubber(INTERNAL, "pub", "completions"))
    relay.add_close_callback(lambda: released.append(True))
    await relay.prime()
    relay.close()
    relay.close()
    assert released == [True]
