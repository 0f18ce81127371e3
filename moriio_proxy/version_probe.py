"""Learning which vLLM version each registered instance runs, from its ``GET /version``.

Heartbeats do not say which vLLM sent them, and vLLM 0.32 and 0.33 differ in what they can
pair (docs/protocol.md §10). So the process that owns discovery (the only process, or the
supervisor of ``serve --workers N``, whose snapshots carry the answer to the workers) asks
each instance when it is added, and again when it comes back after an eviction or
re-announces itself with another shape (a restart, possibly on another release). Until an
answer arrives the version is unknown, which pairing treats as the oldest supported
release; an instance that does not answer is asked again with a growing delay for as long
as it stays registered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .protocol import Role
from .registry import Entry, Registry
from .tasks import BackgroundTasks
from .upstream import Upstream, UpstreamError
from .versions import SUPPORTED, parse_version_answer

log = logging.getLogger("moriio_proxy.versions")

TIMEOUT = 3.0  # seconds for one GET /version; a live vLLM answers in milliseconds
RETRY = (1.0, 60.0)  # first and largest delay before asking an instance again


class VersionProbe:
    """Asks every registered instance for its version and records it on its Entry.

    ``on_learned`` is called after a version was recorded (the supervisor republishes its
    snapshot then). ``upstream`` must be started before ``start()``.
    """

    def __init__(
        self,
        registry: Registry,
        upstream: Upstream,
        *,
        on_learned: Callable[[], None] | None = None,
        timeout: float = TIMEOUT,
        retry: tuple[float, float] = RETRY,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.on_learned = on_learned
        self.timeout = timeout
        self.retry = retry
        self._tasks = BackgroundTasks()
        self._probing: dict[tuple[Role, str], asyncio.Task[None]] = {}
        self._started = False

    async def start(self) -> None:
        """Probe what is registered already, then every instance that arrives."""
        if self._started:
            return
        self._started = True
        registry = self.registry
        registry.instance_added.connect(self._probe_later, sender=registry, weak=False)
        registry.instance_updated.connect(self._probe_later, sender=registry, weak=False)
        registry.instance_removed.connect(self._forget, sender=registry, weak=False)
        for entry in registry.entries():
            self._probe(entry)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        registry = self.registry
        registry.instance_added.disconnect(self._probe_later, sender=registry)
        registry.instance_updated.disconnect(self._probe_later, sender=registry)
        registry.instance_removed.disconnect(self._forget, sender=registry)
        self._probing.clear()
        await self._tasks.cancel_all()

    def _probe_later(self, _sender: Any, entry: Entry, **_: Any) -> None:
        self._probe(entry)

    def _probe(self, entry: Entry) -> None:
        """(Re)start asking one instance; a probe still running for it is replaced."""
        key = entry.instance.key
        running = self._probing.pop(key, None)
        if running is not None:
            running.cancel()
        self._probing[key] = self._tasks.spawn(self._learn(entry), name=f"version {key[1]}")

    def _forget(self, _sender: Any, entry: Entry, **_: Any) -> None:
        running = self._probing.pop(entry.instance.key, None)
        if running is not None:
            running.cancel()

    async def _learn(self, entry: Entry) -> None:
        delay = self.retry[0]
        instance = entry.instance
        while self.registry.get(instance.key) is entry:
            text = await self._ask(entry)
            if text is not None:
                self._record(entry, text)
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry[1])
        if self._probing.get(instance.key) is asyncio.current_task():
            del self._probing[instance.key]

    async def _ask(self, entry: Entry) -> str | None:
        url = entry.instance.base_url + "/version"
        try:
            payload = await self.upstream.get_json(url, self.timeout)
        except UpstreamError as exc:
            log.debug("GET %s failed: %s", url, exc.message)
            return None
        text = parse_version_answer(payload)
        if text is None:
            log.warning("GET %s answered no vLLM version: %.200r", url, payload)
        return text

    def _record(self, entry: Entry, text: str) -> None:
        inst = entry.instance
        if not entry.set_version(text):
            return
        release = entry.release
        known = release is not None and f"{release[0]}.{release[1]}" in SUPPORTED
        log.log(
            logging.INFO if known else logging.WARNING,
            "%s instance %s runs vLLM %s%s",
            inst.role,
            inst.http_address,
            text,
            ""
            if known
            else f" (not a supported release: {', '.join(SUPPORTED)}; "
            "the proxy applies the rules of the nearest one)",
        )
        if self.on_learned is not None:
            self.on_learned()
