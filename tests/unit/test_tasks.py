"""BackgroundTasks: held while they run, cancelled and awaited together, failures logged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from moriio_proxy.tasks import BackgroundTasks


async def test_a_task_is_held_while_it_runs_and_dropped_when_done() -> None:
    tasks = BackgroundTasks()
    go = asyncio.Event()

    async def work() -> int:
        await go.wait()
        return 7

    task = tasks.spawn(work(), name="work")
    assert list(tasks) == [task] and len(tasks) == 1
    assert task.get_name() == "work"
    go.set()
    assert await task == 7
    assert len(tasks) == 0 and not tasks


async def test_cancel_all_cancels_and_waits_for_the_clean_up() -> None:
    tasks = BackgroundTasks()
    cleaned: list[str] = []
    started = asyncio.Event()

    async def forever(name: str) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # clean-up that itself awaits
            cleaned.append(name)

    spawned = [tasks.spawn(forever(n)) for n in ("a", "b", "c")]
    await started.wait()
    await tasks.cancel_all()
    assert sorted(cleaned) == ["a", "b", "c"]
    assert all(t.cancelled() for t in spawned)
    assert len(tasks) == 0
    await tasks.cancel_all()  # again: nothing left, returns at once


async def test_work_spawned_during_cancellation_is_cancelled_too() -> None:
    tasks = BackgroundTasks()
    late: list[asyncio.Task[Any]] = []
    started = asyncio.Event()

    async def spawns_on_the_way_out() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            late.append(tasks.spawn(asyncio.Event().wait()))

    tasks.spawn(spawns_on_the_way_out())
    await started.wait()
    await tasks.cancel_all()
    assert len(late) == 1 and late[0].cancelled()
    assert len(tasks) == 0


async def test_a_task_that_fails_while_being_cancelled_does_not_break_cancel_all() -> None:
    tasks = BackgroundTasks()
    started = asyncio.Event()

    async def stubborn() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("clean-up failed") from None

    other = tasks.spawn(asyncio.Event().wait())
    tasks.spawn(stubborn())
    await started.wait()
    await tasks.cancel_all()
    assert other.cancelled() and len(tasks) == 0


async def test_a_failed_task_is_logged_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()

    async def broken() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="moriio_proxy.tasks"):
        task = tasks.spawn(broken(), name="sweeper")
        await asyncio.gather(task, return_exceptions=True)
    [record] = caplog.records
    assert "sweeper" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert len(tasks) == 0


async def test_cancelled_and_finished_tasks_are_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks()

    async def quick() -> None:
        return None

    with caplog.at_level(logging.DEBUG, logger="moriio_proxy.tasks"):
        await tasks.spawn(quick())
        tasks.spawn(asyncio.Event().wait())
        await asyncio.sleep(0)
        await tasks.cancel_all()
    assert caplog.records == []
