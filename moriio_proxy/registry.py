"""Live instances by role, kept fresh by heartbeats and evicted by silence.

vLLM has no goodbye message: an instance is alive while it keeps re-announcing itself, so
liveness here is heartbeat recency, and the in-flight counters that load balancing reads
live beside the instance they count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from blinker import Signal

from .protocol import Instance, Role, TransferMode
from .versions import Release, parse_release

UpsertResult = Literal["added", "refreshed", "updated", "conflict"]


@dataclass
class Entry:
    """A registered instance plus what the proxy knows of it."""

    instance: Instance
    first_seen: float
    last_seen: float
    static: bool = False
    inflight: list[int] = field(default_factory=list)  # one counter per DP rank
    failures: int = 0  # consecutive failed legs; any success resets it
    ejected_until: float = 0.0  # out of rotation until then, heartbeat or not
    # Drained by an operator (admin API): no new legs, in-flight ones finish. Survives
    # heartbeats and restarts with another shape; lost only when the entry is removed.
    draining: bool = False
    # In a worker of ``serve --workers N``: the fleet's in-flight legs per rank, from the
    # supervisor's last snapshot (``inflight`` stays this process's own, for routing).
    fleet_inflight: tuple[int, ...] | None = None
    # What GET /version answered (None: not known yet, treated as the oldest supported
    # release), and its (major, minor), which pairing reads on every request.
    vllm_version: str | None = None
    release: Release | None = None

    def __post_init__(self) -> None:
        if not self.inflight:
            self.inflight = [0] * self.instance.dp_size

    def set_version(self, text: str | None) -> bool:
        """Record the instance's vLLM version; True when that changed what was known."""
        if text == self.vllm_version:
            return False
        self.vllm_version = text
        self.release = parse_release(text)
        return True

    @property
    def total_inflight(self) -> int:
        return sum(self.inflight)


class Registry:
    """Instances keyed by ``(role, http_address)``, as docs/protocol.md §2.2 requires.

    Signals (blinker, one set per registry so tests never share state):
    ``instance_added(entry)``, ``instance_updated(entry)`` (the same address announced a
    different shape: the instance restarted with other settings) and
    ``instance_removed(entry, reason=...)``.
    """

    def __init__(
        self,
        ttl: float,
        *,
        pinned_mode: TransferMode | None = None,
        eject_after: int = 0,
        eject_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        https: bool = False,
    ) -> None:
        self.ttl = ttl
        # --upstream-scheme https: every instance is reached over TLS (heartbeats carry no
        # scheme); never a downgrade of a static instance listed with https://.
        self.https = https
        self.pinned_mode = pinned_mode
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self._clock = clock
        self._entries: dict[tuple[Role, str], Entry] = {}
        self.instance_added = Signal()
        self.instance_updated = Signal()
        self.instance_removed = Signal()

    @property
    def mode(self) -> TransferMode | None:
        """The transfer mode in force: pinned by config, else that of the live instances."""
        if self.pinned_mode is not None:
            return self.pinned_mode
        for entry in self._entries.values():
            return entry.instance.transfer_mode
        return None

    def upsert(self, instance: Instance, *, static: bool = False) -> UpsertResult:
        """Record a heartbeat; refuse an instance whose mode disagrees with the one in force."""
        if self.https and instance.scheme != "https":
            instance = replace(instance, scheme="https")
        mode = self.mode
        existing = self._entries.get(instance.key)
        alone = existing is not None and len(self._entries) == 1 and self.pinned_mode is None
        if mode is not None and instance.transfer_mode != mode and not alone:
            return "conflict"
        now = self._clock()
        if existing is None:
            entry = Entry(instance, first_seen=now, last_seen=now, static=static)
            self._entries[instance.key] = entry
            self.instance_added.send(self, entry=entry)
            return "added"
        existing.last_seen = now
        if existing.instance == instance:
            return "refreshed"
        # Same address, new shape: the instance restarted with other settings.
        # Counters grow in place and never shrink, so legs still running on a rank that
        # no longer exists finish their bookkeeping on the list they incremented.
        existing.instance = instance
        missing = instance.dp_size - len(existing.inflight)
        if missing > 0:
            existing.inflight.extend([0] * missing)
        self.instance_updated.send(self, entry=existing)
        return "updated"

    def clock(self) -> float:
        """The registry's notion of now (injectable for tests)."""
        return self._clock()

    def get(self, key: tuple[Role, str]) -> Entry | None:
        return self._entries.get(key)

    def remove(self, key: tuple[Role, str], reason: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.instance_removed.send(self, entry=entry, reason=reason)
        return entry

    def sweep(self) -> list[Entry]:
        """Evict every instance silent for longer than the TTL; static ones never expire."""
        deadline = self._clock() - self.ttl
        stale = [k for k, e in self._entries.items() if not e.static and e.last_seen < deadline]
        return [e for k in stale if (e := self.remove(k, "heartbeat_timeout")) is not None]

    def healthy(self, role: Role) -> list[Entry]:
        """Live instances of a role (heartbeat within the TTL), in registration order."""
        deadline = self._clock() - self.ttl
        return [
            e
            for e in self._entries.values()
            if e.instance.role == role and (e.static or e.last_seen >= deadline)
        ]

    def routable(self, role: Role) -> list[Entry]:
        """Live instances not draining and not ejected for failing; all live undrained ones
        if every one is ejected.

        Ejection guards against one broken instance; when all of a role look broken the
        fault is more likely shared (a network blip), and refusing everything would turn
        it into a full outage, so they are all tried again (Envoy's "panic" mode). A drain
        is an operator's decision, not a symptom, so no panic brings a draining one back.
        """
        # healthy()'s test and the drain in one pass: this runs twice per request.
        now = self._clock()
        deadline = now - self.ttl
        live = [
            e
            for e in self._entries.values()
            if e.instance.role == role and not e.draining and (e.static or e.last_seen >= deadline)
        ]
        usable = [e for e in live if e.ejected_until <= now]
        return usable or live

    def is_ejected(self, entry: Entry) -> bool:
        return entry.ejected_until > self._clock()

    def eject(self, entry: Entry, seconds: float) -> None:
        """Take ``entry`` out of rotation for ``seconds`` (an operator's ejection: the same
        rest, and the same panic rule, as one earned by failures)."""
        entry.ejected_until = self._clock() + seconds

    def report_success(self, entry: Entry) -> None:
        entry.failures = 0

    def report_failure(self, entry: Entry) -> bool:
        """Count a failed leg; eject the instance after ``eject_after`` in a row.

        An instance returning from ejection that fails again is ejected at once: its
        counter still stands, since only a served request resets it (a heartbeat does not).
        """
        entry.failures += 1
        if not self.eject_after or entry.failures < self.eject_after:
            return False
        if self.is_ejected(entry):
            return False
        self.eject(entry, self.eject_seconds)
        return True

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def age(self, entry: Entry) -> float:
        return self._clock() - entry.first_seen

    def silence(self, entry: Entry) -> float:
        return self._clock() - entry.last_seen

    def track(self, entry: Entry, rank: int = 0) -> _Tracked:
        """Count one in-flight leg on ``(entry, rank)`` for as long as the block runs."""
        return _Tracked(entry.inflight, rank)


class _Tracked:
    """The context manager behind ``Registry.track`` (a class: two of them run per
    request, and a generator-based one costs several times as much)."""

    __slots__ = ("_counters", "_rank")

    def __init__(self, counters: list[int], rank: int) -> None:
        self._counters = counters
        self._rank = rank

    def __enter__(self) -> None:
        self._counters[self._rank] += 1

    def __exit__(self, *_: object) -> None:
        self._counters[self._rank] -= 1
