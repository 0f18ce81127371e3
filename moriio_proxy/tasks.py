"""Background tasks owned by one object: spawned, kept alive, cancelled and awaited together.

Long-lived loops (a discovery listener, a pod watch, a sweeper) and fire-and-forget work
share one lifecycle problem. The event loop keeps only weak references to tasks, so a task
nobody holds can be garbage-collected while it runs; and at shutdown each one must be
cancelled *and awaited*, or it outlives what it uses (a closed socket, a closed API
client) and the loop reports it pending at exit.

``asyncio.TaskGroup`` (Python 3.11+; this package supports 3.10) answers a different
question: structured concurrency for one ``async with`` block. Its exit waits for every
task to *finish*, and the first task that fails cancels its siblings and raises an
ExceptionGroup. Background work spans separate ``start()`` and ``stop()`` calls rather
than one block, never finishes by itself, and one failed loop must not take its siblings
down. Hence this small set instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

log = logging.getLogger("moriio_proxy.tasks")

_T = TypeVar("_T")


class BackgroundTasks:
    """Tasks spawned by one owner, held strongly until they end, cancelled on demand.

    A task that dies of an exception is logged at once (with its name) instead of as
    "Task exception was never retrieved" whenever it happens to be garbage-collected.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str | None = None) -> asyncio.Task[_T]:
        """Run ``coro`` as a task of this set (needs a running loop)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)  # the strong reference the event loop does not keep
        task.add_done_callback(self._done)
        return task

    async def cancel_all(self) -> None:
        """Cancel every task and wait until all have ended; safe to call again.

        Tasks spawned while the others wind down (a cancellation handler may start
        clean-up work) are cancelled too, so the set is empty when this returns.
        """
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieving it also silences the loop's own report
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)
