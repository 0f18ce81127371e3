"""Fault draws and what a drawn fault decides at token boundaries (no sockets)."""

from __future__ import annotations

import asyncio
import math

import pytest

from moriio_proxy.sim import SimFaults
from moriio_proxy.sim.engine.request import ENGINE_DEAD, TokenEvent
from moriio_proxy.sim.faults import DrawnFault, FaultInjector, stall


def test_draws_repeat_with_the_seed_and_follow_probability() -> None:
    def pattern(seed: int) -> list[bool]:
        inj = FaultInjector(SimFaults(status=500, probability=0.5), seed, "t")
        return [inj.draw() is not None for _ in range(200)]

    first = pattern(1)
    assert first == pattern(1) and first != pattern(2)
    assert 60 < sum(first) < 140


def test_no_draw_without_a_per_request_fault_or_with_an_invalid_one() -> None:
    inj = FaultInjector(SimFaults(refuse_connections=True), 0, "t")
    assert inj.draw() is None
    inj.faults.status = 200  # mutated in place into something invalid: not applied
    assert inj.draw() is None
    inj.faults.status = 502
    drawn = inj.draw()
    assert drawn is not None and drawn.status == 502
    inj.faults.status = 503
    assert drawn.status == 502  # a draw is a snapshot


def test_assignment_is_validated_and_changes_are_copies() -> None:
    inj = FaultInjector(SimFaults(), None, "t")
    with pytest.raises(TypeError):
        inj.faults = {"status": 500}  # type: ignore[assignment]
    with pytest.raises(ValueError, match="probability"):
        inj.faults = SimFaults(probability=2)
    changed = inj.changed(die_after_tokens=2)
    assert changed.die_after_tokens == 2 and inj.faults.die_after_tokens is None
    with pytest.raises(TypeError, match="unknown SimFaults field"):
        inj.changed(bogus=1)


def test_stall_fires_once_and_the_cut_from_k_tokens_on() -> None:
    f = DrawnFault(status=None, stall_first_byte=None, die_after=3, stall_after=(2, 0.5))
    assert [f.stall_due(t) for t in (0, 1, 2, 3)] == [None, None, 0.5, None]
    assert [f.cut_due(t) for t in (2, 3, 4)] == [False, True, True]


async def test_a_stall_buffers_events_and_ends_early_on_engine_death() -> None:
    queue: asyncio.Queue = asyncio.Queue()
    ev = TokenEvent(0, " a", 1)
    queue.put_nowait(ev)
    queue.put_nowait(ENGINE_DEAD)
    f = DrawnFault(None, None, None, None)
    assert await stall(queue, math.inf, f.buffer) is ENGINE_DEAD
    assert list(f.buffer) == [ev]
    assert await f.next_event(queue) is ev  # buffered events come first
    assert await stall(queue, 0.01, None) is None  # a finite stall just ends
