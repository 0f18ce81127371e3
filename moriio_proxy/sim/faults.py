"""Fault injection: the live SimFaults of an instance, the seeded per-request draws, and what
a drawn fault does to one request's stream of engine events.

Faults are a test device, not vLLM behaviour: everything else about a faulted instance stays
0.32's. The HTTP side (closing the listener, the ``/sim/*`` routes) lives in ``api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .engine.request import OutputQueue, StreamSignal, TokenEvent
from .settings import SimFaults

logger = logging.getLogger(__name__)

_LISTENER_POLL = 0.02  # seconds: how soon a mutated SimFaults.refuse_connections takes effect


@dataclass
class DrawnFault:
    """The faults one generation request drew (a snapshot: later changes do not affect it)."""

    status: int | None
    stall_first_byte: float | None
    die_after: int | None
    stall_after: tuple[int, float] | None
    stalled: bool = False
    #: Engine events (and an end signal) that arrived while the request was stalled.
    buffer: deque[TokenEvent | StreamSignal] = field(default_factory=deque)

    def stall_due(self, tokens: int) -> float | None:
        """Seconds to stall now that ``tokens`` tokens went out (once per request), or None."""
        if self.stall_after is None or self.stalled or tokens < self.stall_after[0]:
            return None
        self.stalled = True
        return self.stall_after[1]

    def cut_due(self, tokens: int) -> bool:
        """True when the connection must be cut now that ``tokens`` tokens went out."""
        return self.die_after is not None and tokens >= self.die_after

    async def next_event(self, queue: OutputQueue) -> TokenEvent | StreamSignal:
        """The next engine event: what arrived during a stall first."""
        if self.buffer:
            return self.buffer.popleft()
        return await queue.get()


async def stall(
    queue: OutputQueue, seconds: float, buffer: deque[TokenEvent | StreamSignal] | None
) -> StreamSignal | None:
    """Stay silent for ``seconds`` (inf: until cancelled). Engine events arriving meanwhile
    go to ``buffer``; an engine death / shutdown ends the stall early (returned)."""
    loop = asyncio.get_running_loop()
    deadline = None if math.isinf(seconds) else loop.time() + seconds
    while True:
        timeout = None if deadline is None else deadline - loop.time()
        if timeout is not None and timeout <= 0:
            return None
        try:
            ev = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(ev, StreamSignal):
            return ev
        if buffer is not None:
            buffer.append(ev)


class FaultInjector:
    """The live faults of one instance and the seeded RNG that decides who gets them."""

    def __init__(self, faults: SimFaults, seed: int | None, tag: str) -> None:
        faults = copy.deepcopy(faults)
        faults.validate()
        self._faults = faults
        self._rng = random.Random(seed)
        self._tag = tag
        self._changed = asyncio.Event()

    @property
    def faults(self) -> SimFaults:
        return self._faults

    @faults.setter
    def faults(self, value: SimFaults) -> None:
        if not isinstance(value, SimFaults):
            raise TypeError(f"faults must be a SimFaults, got {type(value).__name__}")
        value.validate()
        self._faults = value
        self._changed.set()

    def changed(self, faults: SimFaults | None = None, **changes: Any) -> SimFaults:
        """A copy of ``faults`` (default: the live ones) with ``changes`` applied."""
        new = copy.deepcopy(faults) if faults is not None else copy.deepcopy(self._faults)
        known = {f.name for f in fields(SimFaults)}
        for key, value in changes.items():
            if key not in known:
                raise TypeError(f"unknown SimFaults field {key!r}")
            setattr(new, key, value)
        return new

    async def watch(self, apply: Callable[[], Awaitable[None]]) -> None:
        """Call ``apply`` at once on assignment, else every poll (fields mutated in place)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), _LISTENER_POLL)
            self._changed.clear()
            try:
                await apply()
            except Exception:
                logger.exception("%s cannot apply refuse_connections", self._tag)

    def draw(self) -> DrawnFault | None:
        """One seeded draw per generation request while a per-request fault is configured."""
        f = self._faults
        if not f.per_request:
            return None
        try:
            f.validate()  # fields may have been mutated in place
        except ValueError as e:
            logger.error("%s invalid SimFaults, not applied: %s", self._tag, e)
            return None
        if self._rng.random() >= f.probability:
            return None
        return DrawnFault(
            status=f.status,
            stall_first_byte=f.stall_first_byte,
            die_after=f.die_after_tokens,
            stall_after=f.stall_after_tokens,
        )
