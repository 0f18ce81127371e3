"""What the OpenAI server hands the engine (EngineRequest) and reads back (TokenEvent, or a
StreamSignal when the engine dies or the instance stops)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..connector import adopt_transfer_id
from ..model import Stopping, ends_at_once
from ..settings import LegRecord


class StreamSignal:
    """A sentinel on an output queue: the request ends without its tokens."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


ENGINE_DEAD = StreamSignal("engine-dead")
SHUTTING_DOWN = StreamSignal("shutting-down")
#: The request finished with an error because its KV never came (0.33 WRITE decode).
KV_LOAD_FAILED = StreamSignal("kv-load-failed")


@dataclass
class TokenEvent:
    """A generated token (or the end) of one choice, from engine task to HTTP handler."""

    index: int
    delta: str
    n_tokens: int
    finish_reason: str | None = None
    stop_reason: str | None = None
    kv_params: dict[str, Any] | None = None
    final: bool = False


#: One HTTP request's stream of engine output, shared by all its choices.
OutputQueue = asyncio.Queue["TokenEvent | StreamSignal"]


@dataclass
class EngineRequest:
    """One engine request: vLLM splits an HTTP request per prompt and per ``n``."""

    index: int  # the OpenAI choice index
    prompt_idx: int
    words: list[str]
    engine_id: str  # vLLM's internal request id, what the connector parses
    rank: int  # the DP rank that runs it
    max_tokens: int
    stopping: Stopping
    kv: dict[str, Any] | None  # this request's own copy of kv_transfer_params
    rec: LegRecord  # the HTTP request it belongs to
    # Set once the prompt is accounted (ModelRunner.account_prompt): vLLM's
    # num_cached_tokens and num_cache_creation_tokens of this request.
    cached_tokens: int = 0
    created_cache_tokens: int = 0

    @property
    def text(self) -> str:
        """The normalised prompt text (what the KV fingerprint is computed from)."""
        return " ".join(self.words)

    @property
    def ends_at_once(self) -> bool:
        return ends_at_once(self.text)

    def adopt_transfer_id(self) -> Any:
        """The transfer id the connector maps this request to (recorded on the leg)."""
        assert self.kv is not None
        tid = adopt_transfer_id(self.kv, self.engine_id)
        self.rec.transfer_id = tid
        return tid
