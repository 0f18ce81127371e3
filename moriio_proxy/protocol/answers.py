"""What a client gets back when the proxy writes the answer itself: vLLM's answer with the
internal id and KV params removed, P's finished answer as SSE chunks, and errors in vLLM's
shape (and the sentence inside anyone's error answer)."""

from __future__ import annotations

from typing import Any

from .instance import Endpoint


def rewrite_id(payload: dict[str, Any], new_id: str) -> dict[str, Any]:
    """Replace vLLM's ``id`` (which embeds the sandwich) and drop internal KV params."""
    if "id" in payload:
        payload["id"] = new_id
    payload.pop("kv_transfer_params", None)
    return payload


def prefill_as_answer(
    payload: dict[str, Any], endpoint: Endpoint, include_usage: bool
) -> list[dict[str, Any]]:
    """P's complete answer (it ended before the length cap) as streaming chunks.

    When P's one token finished the request there is nothing for D to continue, and a
    streaming client still deserves a well-formed SSE answer.
    """
    base: dict[str, Any] = {k: payload[k] for k in ("id", "created", "model") if k in payload}
    chunks: list[dict[str, Any]] = []
    for choice in payload.get("choices") or []:
        index = choice.get("index", 0)
        extra = {"finish_reason": choice.get("finish_reason"), "index": index}
        if endpoint == "chat":
            message = choice.get("message") or {}
            role_chunk = {"index": index, "delta": {"role": "assistant", "content": ""}}
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [role_chunk]})
            delta = {"content": message.get("content") or ""}
            chunk_choice = {**extra, "delta": delta, "logprobs": None}
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [chunk_choice]})
        else:
            chunk_choice = {
                **extra,
                "text": choice.get("text") or "",
                "logprobs": None,
                "stop_reason": choice.get("stop_reason"),
            }
            chunks.append({**base, "object": "text_completion", "choices": [chunk_choice]})
    if include_usage and payload.get("usage") is not None:
        kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        chunks.append({**base, "object": kind, "choices": [], "usage": payload["usage"]})
    return chunks


def error_body(
    message: str, status: int, err_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """vLLM's error shape, so clients and SDKs parse proxy errors like engine errors."""
    return {
        "error": {
            "message": message,
            "type": err_type or _ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def error_message(payload: Any) -> str | None:
    """The human sentence inside an error answer, or None when it has none.

    vLLM and the proxy send ``{"error": {"message": ...}}``; older servers and other
    frameworks send ``{"error": "..."}`` or ``{"message": "..."}``, and the proxy's /ready
    says why it is not ready in ``{"reason": "..."}``. Whoever reports a failed call (the
    upstream client, ``check``) wants that sentence rather than the raw body.
    """
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    for key in ("message", "reason"):
        if isinstance(payload.get(key), str):
            return str(payload[key])
    return None


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",  # the names OpenAI's SDK gives these statuses
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestEntityTooLarge",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
