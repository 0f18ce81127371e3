"""vLLM's OpenAI error shape, and the exception request validation raises to produce it."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any


class BadRequest(Exception):
    """A request vLLM's API server rejects before it reaches the engine."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        err_type: str = "BadRequestError",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}`` as vLLM answers it."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_type(status: int) -> str:
    """vLLM-style error type for a status: 503 -> ServiceUnavailableError, 500 ->
    InternalServerError, 429 -> TooManyRequestsError."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"
    name = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", phrase) if w)
    return name if name.endswith("Error") else name + "Error"
