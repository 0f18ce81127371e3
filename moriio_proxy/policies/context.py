"""What a routing policy may see of a request, built once per request.

A policy must not dig through the request body itself: that would repeat work on every
retry and for each of the two roles. So the proxy reads what the configured policies
declare they need (``reads``) into one small frozen value, and skips what nobody needs:
rendering the prompt text costs a pass over the whole request, and only cache-aware
routing uses it.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ..protocol import ClientRequest

Read = Literal["text", "session"]

# Separators that cannot be confused with message text's own structure: the rendering of
# [a, b] must differ from that of [a + b], or two conversations could share a "prefix".
_FIELD = "\x1f"
_RECORD = "\x1e"


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """The parts of a request routing may depend on.

    ``text`` is the request's prompt as a string (or, for a tokenised prompt, the token
    ids packed as bytes) such that a conversation's next turn has this turn's text as a
    prefix; ``session`` pins a conversation to one place. Either is None when no policy
    reads it or the request has none.
    """

    text: str | bytes | None = None
    session: str | None = None


EMPTY = RoutingContext()


def routing_context(
    request: ClientRequest, session_header: str | None, reads: Collection[Read]
) -> RoutingContext:
    """The context the configured policies need, and nothing more."""
    if not reads:
        return EMPTY
    text = prompt_text(request) if "text" in reads else None
    session = session_key(request.body, session_header) if "session" in reads else None
    return RoutingContext(text, session)


def session_key(body: Mapping[str, Any], header: str | None) -> str | None:
    """The client's session: its session header, else the OpenAI ``user`` field."""
    if header:
        value = header.strip()
        if value:
            return value
    user = body.get("user")
    if isinstance(user, str) and user:
        return user
    return None


def prompt_text(request: ClientRequest) -> str | bytes | None:
    """The prompt as one string (chat: the rendered messages), or None if there is none."""
    body = request.body
    if request.endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        tools = body.get("tools")
        head = _json(tools) + _RECORD if tools else ""
        return head + render_messages(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a single prompt wrapped in a list
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return _tokens(prompt)
    return None


def render_messages(messages: list[Any]) -> str:
    """Role and content of each message in order, one record each.

    The rendering of a conversation is the concatenation of its messages' renderings, so
    turn N+1 (turn N's messages, the answer, the next question) starts with turn N's
    rendering: the property that lets the next turn find the instance holding its
    history. Content may be a string or a list of parts; a text part contributes its
    text, any other part (an image, audio) its JSON, so different images differ.
    """
    out: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            out.append(_json(message))
            out.append(_RECORD)
            continue
        out.append(str(message.get("role")))
        out.append(_FIELD)
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                out.append(text if isinstance(text, str) else _json(part))
        elif content is not None:
            out.append(_json(content))
        calls = message.get("tool_calls")
        if calls:
            out.append(_FIELD)
            out.append(_json(calls))
        out.append(_RECORD)
    return "".join(out)


def _tokens(prompt: list[Any]) -> bytes | None:
    """Token ids packed four bytes each: slicing and hashing bytes is C work, not a loop."""
    try:
        return array("I", prompt).tobytes()
    except (TypeError, OverflowError):
        return None


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # not from a JSON body (orjson's error is a TypeError)
        return repr(value)
