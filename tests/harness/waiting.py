"""Waiting for a state instead of sleeping for a guess.

A wait for a state returns as soon as the state is reached, so its limit is not a measure
of speed: it only decides how long a broken test takes to fail. It is therefore generous
(``STATE_TIMEOUT``), because the machines that run this suite are shared and often busy,
and a limit tuned on an idle one fails there for no reason.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

# How long any wait for a state may take before the test fails.
STATE_TIMEOUT = 30.0

# The bound on "it happened at once": a reaction with no timer of its own in between (a
# cut connection noticed, a stop answering what it stopped). Far above what that takes on
# a busy machine; a test using it must make the wrong outcome take longer still (or never
# happen), so that the bound tells the two apart.
PROMPTLY = 5.0


async def eventually(
    predicate: Callable[[], object] | Callable[[], Awaitable[object]],
    timeout: float = STATE_TIMEOUT,
    interval: float = 0.01,
    what: str = "",
) -> float:
    """Poll ``predicate()`` (a function or a coroutine function) until it is true; return
    the seconds that took. Fails with an AssertionError after ``timeout`` seconds (``what``
    names the state in the message)."""
    started = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what or 'condition'} not reached within {timeout:g} s")
        await asyncio.sleep(interval)


async def still_pending(task: asyncio.Future[Any], seconds: float) -> bool:
    """True if ``task`` has not finished after ``seconds`` (it is left running).

    For asserting that something does NOT happen: the only place a fixed wait belongs.
    """
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done
