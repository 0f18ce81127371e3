"""One generation HTTP request in flight (Exchange), and the ledger that records every such
request for tests to read (LegRecord, SimStats).

The exchange is what the JSON and SSE writers share: the request, its record and answer
shape, its engine requests and their output queue, and the fault it drew, which fires at
token boundaries (``checkpoint``) whichever writer is running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiohttp import web

from ..engine.core import EngineCore
from ..engine.request import (
    ENGINE_DEAD,
    KV_LOAD_FAILED,
    EngineRequest,
    OutputQueue,
    StreamSignal,
    TokenEvent,
)
from ..faults import DrawnFault, stall
from ..settings import LegRecord, SimConfig, SimStats
from .errors import error_body
from .validation import ResponseSpec

logger = logging.getLogger(__name__)


class ConnectionCut(Exception):
    """die_after_tokens fired: the connection is closed, the handler must end silently."""


class Ledger:
    """Records each generation request (``SimInstance.legs``) and the request counters."""

    def __init__(self, config: SimConfig, stats: SimStats, tag: str) -> None:
        self.legs: list[LegRecord] = []
        self.tag = tag
        self._config = config
        self._stats = stats

    def profiler(self, running: bool) -> None:
        """Count a profiler start or stop the server answered 200."""
        self._stats.profiling = running
        if running:
            self._stats.profiles_started += 1
        else:
            self._stats.profiles_stopped += 1

    def open(self, request: web.Request) -> LegRecord:
        rec = LegRecord(path=request.path, headers=dict(request.headers), started_at=time.time())
        if len(self.legs) >= self._config.max_leg_records:
            del self.legs[: len(self.legs) // 2]
        self.legs.append(rec)
        self._stats.requests += 1
        return rec

    def finish(self, rec: LegRecord, status: int) -> None:
        rec.status = status
        rec.finished = True
        rec.finished_at = time.time()
        if status == 200:
            self._stats.completed += 1
        elif 400 <= status < 500:
            self._stats.errors_4xx += 1
        elif status >= 500:
            self._stats.errors_5xx += 1

    def cancelled(self, rec: LegRecord) -> None:
        if not rec.cancelled and not rec.finished:
            rec.cancelled = True
            rec.finished_at = time.time()
            self._stats.cancelled += 1
            logger.info("%s request %s cancelled by the client", self.tag, rec.request_id)

    def fault(self, rec: LegRecord | None, kind: str) -> None:
        """Count an injected fault that actually happened (on the leg too, if any)."""
        applied = self._stats.faults_applied
        applied[kind] = applied.get(kind, 0) + 1
        if rec is not None:
            rec.faults.append(kind)


def signal_error(signal: StreamSignal, dead_reason: str | None) -> tuple[int, dict[str, object]]:
    """The status and vLLM error body for a request ended by an engine death or shutdown,
    or finished with an error (a failed KV load: vLLM's GenerationError says no more)."""
    if signal is KV_LOAD_FAILED:
        return 500, error_body("Internal server error", "InternalServerError", 500)
    if signal is ENGINE_DEAD:
        message = f"EngineCore died: {dead_reason}"
        return 500, error_body(message, "InternalServerError", 500)
    return 503, error_body("The server is shutting down.", "ServiceUnavailableError", 503)


@dataclass
class Exchange:
    """One generation HTTP request from validation to its last byte."""

    request: web.Request
    rec: LegRecord
    spec: ResponseSpec
    choices: list[EngineRequest]
    queue: OutputQueue
    fault: DrawnFault | None
    ledger: Ledger
    engine: EngineCore
    tokens: int = 0  # engine tokens handed out so far, across all choices

    def prompt_len(self, index: int) -> int:
        """Prompt tokens of the choice with this OpenAI ``index``."""
        for ch in self.choices:
            if ch.index == index:
                return self.spec.prompt_lens[ch.prompt_idx]
        raise KeyError(index)

    async def next_event(self) -> TokenEvent | StreamSignal:
        if self.fault is not None:
            return await self.fault.next_event(self.queue)
        return await self.queue.get()

    def finish(self, status: int) -> None:
        self.ledger.finish(self.rec, status)

    def cancelled(self) -> None:
        self.ledger.cancelled(self.rec)

    def ended_by(self, signal: StreamSignal) -> tuple[int, dict[str, object]]:
        return signal_error(signal, self.engine.dead_reason)

    def failure(self, signal: StreamSignal) -> web.Response:
        """The JSON answer of a request ended before its headers went out."""
        status, body = self.ended_by(signal)
        self.finish(status)
        return web.json_response(body, status=status)

    async def stall_first_byte(self, seconds: float) -> StreamSignal | None:
        """Say nothing before the engine starts; an engine death or shutdown ends it early."""
        self.ledger.fault(self.rec, "stall_first_byte")
        logger.info(
            "%s fault: %s silent for %ss before the first byte",
            self.ledger.tag,
            self.rec.request_id,
            seconds,
        )
        return await stall(self.queue, seconds, None)

    async def checkpoint(self) -> None:
        """Where a drawn fault fires: once ``tokens`` tokens have been handed out, before
        anything else is sent (a stall first when both fire at one point)."""
        fault, tokens = self.fault, self.tokens
        if fault is None:
            return
        seconds = fault.stall_due(tokens)
        if seconds is not None:
            self.ledger.fault(self.rec, "stall_after_tokens")
            logger.info(
                "%s fault: %s silent for %ss after %d tokens",
                self.ledger.tag,
                self.rec.request_id,
                seconds,
                tokens,
            )
            signal = await stall(self.queue, seconds, fault.buffer)
            if signal is not None:
                fault.buffer.appendleft(signal)
        if fault.cut_due(tokens):
            self.ledger.fault(self.rec, "die_after_tokens")
            logger.info(
                "%s fault: cutting the connection of %s after %d tokens",
                self.ledger.tag,
                self.rec.request_id,
                tokens,
            )
            transport = self.request.transport
            if transport is not None:
                transport.close()  # flushes what was written, then FIN: no final chunk
            raise ConnectionCut
