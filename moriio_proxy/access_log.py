"""One line per client request on the ``moriio_proxy.access`` logger, at info.

Text by default (``key=value`` pairs a person reads and ``grep`` finds), or one JSON object
per line for a log pipeline. The line is made from the request's ``RequestRecord`` only:
the id the client knows (never the internal request-id sandwich, which holds internal
addresses), the pair, the outcome and the phase timings; never anything of the body.
Nothing is formatted when the logger is not enabled for info.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson

from .record import RequestRecord

LOGGER = "moriio_proxy.access"
AccessLogFormat = Literal["text", "json", "off"]


class AccessLog:
    def __init__(self, fmt: Literal["text", "json"], logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger(LOGGER)
        self._format = _json if fmt == "json" else _text

    def write(self, record: RequestRecord) -> None:
        if self._log.isEnabledFor(logging.INFO):
            self._log.info("%s", self._format(fields(record)))


def fields(record: RequestRecord) -> dict[str, Any]:
    """The line's fields, in the order the text format shows them; None left out."""
    out: dict[str, Any] = {
        "request_id": record.request_id,
        "endpoint": record.endpoint,
        "status": record.status,
        "outcome": record.outcome,
        "mode": record.mode,
    }
    if record.prefill is not None:
        out["prefill"] = record.prefill
        out["dp_rank"] = record.rank
        out["decode"] = record.decode
    out["attempts"] = record.attempts
    out["stream"] = record.stream
    if record.stream:
        out["chunks"] = record.chunks
    out.update(record.phases())
    return out


def _text(values: dict[str, Any]) -> str:
    """``key=value`` pairs; a value with a space or a quote (none the proxy makes) is
    JSON-quoted so the line still splits on spaces."""
    request_id = values["request_id"]
    if " " in request_id or '"' in request_id:
        values["request_id"] = orjson.dumps(request_id).decode()
    values["stream"] = "yes" if values["stream"] else "no"
    return " ".join([f"{k}={v}" for k, v in values.items()])


def _json(values: dict[str, Any]) -> str:
    return orjson.dumps(values).decode()
