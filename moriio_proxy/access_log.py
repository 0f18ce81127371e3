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
        "prefill": record.prefill,
        "dp_rank": record.rank,
        "decode": record.decode,
        "attempts": record.attempts,
        "stream": record.stream,
    }
    if record.stream:
        out["chunks"] = record.chunks
    out.update(record.phases())
    return {k: v for k, v in out.items() if v is not None}


def _text(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={_show(v)}" for k, v in values.items())


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if text and " " not in text and '"' not in text else orjson.dumps(text).decode()


def _json(values: dict[str, Any]) -> str:
    return orjson.dumps(values).decode()
