"""Fixtures for every test tier; the helpers behind them are in tests/harness/."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.harness.clock import ManualClock
from tests.harness.ports import refused_port


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session. Its total limit only stops a hung test: no request a test makes
    should come near it, even on a loaded machine."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
def clock() -> ManualClock:
    """A clock that stands still until the test moves it."""
    return ManualClock()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where connections are refused for the whole test: nothing listens
    there, and nothing else can bind it meanwhile."""
    with refused_port() as port:
        yield port
