"""HTTP answers as data, and what they say: the verdicts' inputs, with no I/O in them.

``probes`` makes the calls and fills an ``Answer``; everything here only reads one, so the
verdicts built on it are tested without sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from ..protocol import error_message

# refused: the host answered, nothing listens. connect_timeout / unreachable / dns: no path
# from here (a network boundary, a firewall that drops). timeout: connected, no answer.
FailureKind = Literal["refused", "connect_timeout", "unreachable", "dns", "timeout", "protocol"]
NO_PATH: tuple[FailureKind, ...] = ("connect_timeout", "unreachable", "dns")

_REJECTED = "moriio_proxy_registrations_rejected_total"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, or why there is none (``failure``), with how long it took."""

    url: str
    seconds: float
    status: int | None = None
    body: Any = None  # parsed JSON, else the text
    headers: dict[str, str] = field(default_factory=dict)  # names lowercased
    failure: FailureKind | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    def describe(self) -> str:
        """What went wrong, in words a person recognises."""
        if self.failure is not None:
            return self.error
        return f"HTTP {self.status}" + (f": {said(self.body)}" if self.body else "")


def said(body: Any) -> str:
    """The error sentence of a body, else a short excerpt of the body itself."""
    message = error_message(body)
    if message is not None:
        return message
    text = body if isinstance(body, str) else json.dumps(body)
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def model_ids(answer: Answer) -> list[str]:
    """The model ids of an OpenAI ``/v1/models`` answer; empty when it is not one."""
    data = answer.body.get("data") if answer.ok and isinstance(answer.body, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def completion_text(answer: Answer) -> str:
    """The first choice's text of a ``/v1/completions`` answer; empty when there is none."""
    body = answer.body
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    text = choices[0].get("text")
    return text if isinstance(text, str) else ""


def registration_rejections(metrics: Answer) -> dict[str, float]:
    """``moriio_proxy_registrations_rejected_total`` by reason, from the proxy's /metrics.

    Empty when /metrics failed or is not the Prometheus text format: the counts only sharpen
    a verdict, so their absence is no failure of its own.
    """
    if not metrics.ok or not isinstance(metrics.body, str):
        return {}
    counts: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(metrics.body):
            for sample in family.samples:
                if sample.name == _REJECTED and "reason" in sample.labels:
                    counts[sample.labels["reason"]] = sample.value
    except ValueError:
        return {}
    return counts
