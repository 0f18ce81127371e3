"""Clocks to hand to ``Registry(clock=...)`` instead of waiting for real time to pass."""

from __future__ import annotations

import time


class ManualClock:
    """Stands still until a test moves it (``clock.now += 5`` or ``advance(5)``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JumpingClock:
    """Real monotonic time plus the jumps a test makes: for a proxy that runs for real
    (heartbeats, timeouts) while a test skips a cooling period instead of sleeping it out."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
