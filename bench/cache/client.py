"""The benchmark's chat clients: closed-loop users, each playing conversations turn by turn.

A user takes the next conversation from a shared list, sends its turns one after the other
(each turn's prompt is the history so far plus a new question) and takes the next
conversation when it is done. Requests are streamed chat completions asking for the usage
chunk, with the conversation's session id in ``X-Session-ID`` and ``user`` (what the
session policy pins on), written as pre-encoded bytes over a keep-alive connection
(``overhead/http1.py``): the machine's cores belong to the simulators and the router.

TTFT is the time from writing the request to the first body byte: the proxies send
nothing before the decode's first chunk, which comes after the prefill. Every answer is
checked against the text the simulated model must produce (``expected_text``); the history
always continues with that text, so one failed turn does not change later prompts.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

from moriio_proxy.sim import chat_prompt_text, expected_text

from ..overhead.http1 import Connection, Response, encode_request
from .workload import Conversation

_CONTENT_RE = re.compile(rb'"content": ?"((?:[^"\\]|\\.)*)"')
_REQUEST_TIMEOUT = 120.0


@dataclass(frozen=True)
class TurnResult:
    conversation: int
    turn: int
    ttft: float  # seconds, request written to first body byte
    latency: float  # seconds, request written to last byte
    prompt_tokens: int | None  # from the usage chunk
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, if reported
    error: str | None  # None: the answer was complete and right
    done: float  # time.monotonic() at the end


def check(resp: Response, expected: str) -> tuple[str | None, int | None, int | None]:
    """(error label or None, prompt tokens, cached tokens) of one streamed answer."""
    if resp.status != 200:
        return f"http_{resp.status}", None, None
    body = resp.body
    if not body.rstrip().endswith(b"data: [DONE]"):
        return "stream_without_done", None, None
    if b"".join(_CONTENT_RE.findall(body)).decode() != expected:
        return ("sse_error" if b'data: {"error"' in body else "wrong_text"), None, None
    prompt_tokens = cached = None
    for line in body.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens")
    return None, prompt_tokens, cached


class _User:
    def __init__(
        self,
        host: str,
        port: int,
        conversations: list[Conversation],
        queue: asyncio.Queue[int],
        answer_tokens: int,
        results: list[TurnResult],
    ) -> None:
        self._address = (host, port)
        self._conversations = conversations
        self._queue = queue
        self._answer_tokens = answer_tokens
        self._results = results
        self._conn: Connection | None = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    index = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._conversation(index)
        finally:
            if self._conn is not None:
                self._conn.close()

    async def _conversation(self, index: int) -> None:
        conv = self._conversations[index]
        answers: list[str] = []
        host, port = self._address
        for turn in range(len(conv.questions)):
            messages = conv.messages(answers, turn)
            expected = expected_text(chat_prompt_text(messages), self._answer_tokens)
            body = {
                "model": "sim-model",
                "messages": messages,
                "max_tokens": self._answer_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "user": conv.session,
            }
            wire = encode_request(
                host,
                port,
                "/v1/chat/completions",
                json.dumps(body, separators=(",", ":")).encode(),
                {"X-Session-ID": conv.session},
            )
            self._results.append(await self._send(index, turn, wire, expected))
            answers.append(expected)

    async def _send(self, index: int, turn: int, wire: bytes, expected: str) -> TurnResult:
        started = time.monotonic()
        try:
            if self._conn is None or self._conn.lost:
                self._conn = await Connection.open(*self._address)
            resp = await asyncio.wait_for(self._conn.request(wire), _REQUEST_TIMEOUT)
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            now = time.monotonic()
            label = "timeout" if isinstance(exc, asyncio.TimeoutError) else "transport"
            return TurnResult(index, turn, now - started, now - started, None, None, label, now)
        if resp.close:
            self._conn.close()
            self._conn = None
        error, prompt_tokens, cached = check(resp, expected)
        return TurnResult(
            index,
            turn,
            resp.first_byte - resp.started,
            resp.done - resp.started,
            prompt_tokens,
            cached,
            error,
            resp.done,
        )


async def play(
    host: str, port: int, conversations: list[Conversation], users: int, answer_tokens: int
) -> list[TurnResult]:
    """Every conversation, by ``users`` concurrent users; the results in completion order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(conversations)):
        queue.put_nowait(i)
    results: list[TurnResult] = []
    clients = [
        _User(host, port, conversations, queue, answer_tokens, results) for _ in range(users)
    ]
    await asyncio.gather(*(c.run() for c in clients))
    return results
