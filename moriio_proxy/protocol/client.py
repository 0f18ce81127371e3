"""A client's OpenAI body checked before any upstream call: what cannot safely become ONE
prefill/decode pair gets a clear 400 here instead of a broken transfer later."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .instance import Endpoint


class RequestError(ValueError):
    """A client request the proxy refuses before any upstream call (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ClientRequest:
    """A validated client body and what the proxy needs to know about it."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    model: str | None
    # The client's own Authorization header, set only when it is forwarded to the
    # instances (--upstream-auth passthrough): both legs carry it.
    authorization: str | None = None


def parse_client_request(
    endpoint: Endpoint, body: Any, *, authorization: str | None = None
) -> ClientRequest:
    """Refuse what cannot safely become ONE prefill/decode pair.

    A list of prompts or ``n > 1`` would make several engine requests share one
    ``transfer_id`` (broken transfers, WRITE decodes that wait forever), so they get a
    clear 400 instead of being forwarded.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
    else:
        _check_single_prompt(body.get("prompt", _MISSING))
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise RequestError(
            "n != 1 is not supported through a prefill/decode proxy: each choice would "
            "need its own KV transfer; send n separate requests",
            "n",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    # Checked here, not left to the decode engine: the prefill leg (one token, no stream
    # options) would pass, and in READ mode its KV would sit on P until defer_timeout.
    if options and stream is not True:
        raise RequestError(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"'{key}' must be an integer", key)
        if value is not None and value < 1:
            raise RequestError(f"'{key}' must be at least 1, got {value}", key)
    model = body.get("model")
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        stream=bool(stream),
        include_usage=bool(options and options.get("include_usage")),
        model=model if isinstance(model, str) else None,
        authorization=authorization,
    )


_MISSING = object()


def _check_single_prompt(prompt: Any) -> None:
    if prompt is _MISSING or prompt is None:
        raise RequestError("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return  # one tokenised prompt
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return
        raise RequestError(
            "a list of prompts is not supported through a prefill/decode proxy: each "
            "prompt needs its own KV transfer; send one request per prompt",
            "prompt",
        )
    raise RequestError("'prompt' must be a string or a list of token ids", "prompt")
