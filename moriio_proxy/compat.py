"""What differs between the Python versions the proxy supports (3.10 and later).

``asyncio.wait_for`` wraps its awaitable in a new task on Python 3.11, and the relay
waits once per stream chunk: a timeout scope (asyncio.timeout on 3.11+, aio-libs'
async-timeout, which aiohttp already depends on, before) bounds a wait without one.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout as timeout_after
else:  # pragma: no cover - exercised on Python 3.10 only
    from async_timeout import timeout as timeout_after

__all__ = ["timeout_after"]
