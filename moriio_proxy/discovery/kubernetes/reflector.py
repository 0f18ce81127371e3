"""One role's pods, mirrored from the API server: list, then watch, forever.

The way client-go's reflectors do it: list, then watch from the list's resourceVersion.
A watch that ends cleanly (the server's timeout) is resumed from the last version seen.
Anything else (410 Gone, an error, a dropped connection) leads to a re-list after a
jittered backoff, and a list replaces the whole picture: a DELETED event lost while the
watch was down never leaves a ghost. What the pods mean is not decided here; the
reflector reports them to its ``PodEvents``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ...protocol import Role
from ..base import RateLimitedLog
from .api import ApiError, ApiGone, PodApi
from .pods import as_mapping, pod_name, pod_version

log = logging.getLogger(__name__)

# A watch that delivered an event, or stayed open this long, proves the API is healthy
# again, so the reconnect backoff starts over.
HEALTHY_WATCH_SECONDS = 10.0


class PodEvents(Protocol):
    """What a reflector reports, in the order the API server said it."""

    def listed(self, role: Role, pods: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """A complete list: exactly these pods (name, object) match the selector now."""

    def changed(self, role: Role, name: str, pod: Mapping[str, Any]) -> None:
        """A pod was added or modified (its readiness, IP or annotations may differ)."""

    def deleted(self, role: Role, name: str) -> None:
        """A pod was deleted, or stopped matching the selector."""


class Reflector:
    """Keeps one role's ``PodEvents`` in step with the pods ``selector`` matches."""

    def __init__(
        self,
        api: PodApi,
        role: Role,
        namespace: str,
        selector: str,
        events: PodEvents,
        *,
        watch_timeout: float,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self.api = api
        self.role = role
        self.namespace = namespace
        self.selector = selector
        self.events = events
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # The last resourceVersion processed (visible for debugging and tests).
        self.resource_version: str | None = None
        self._log = RateLimitedLog(log)

    async def run(self) -> None:
        """List, then watch from the list's version, forever; no exception ends it."""
        delay = self.backoff_initial
        version: str | None = None
        while True:
            healthy = False
            try:
                if version is None:
                    version = await self._list()
                version, healthy = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except ApiGone:
                log.info("kubernetes %s watch: history expired (410), re-listing", self.role)
                version = None
            except Exception as exc:
                version = None
                self._log(
                    logging.WARNING,
                    f"k8s-error:{self.role}",
                    "kubernetes %s watch failed, re-listing after backoff: %s%s",
                    self.role,
                    _describe(exc),
                    _hint(exc),
                )
            if healthy:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    async def _list(self) -> str:
        """One consistent list, reported whole; return its version."""
        pods = await self.api.list_pods(self.namespace, self.selector)
        named = [
            (name, pod)
            for pod in pods.items
            if isinstance(pod, Mapping) and (name := pod_name(pod)) is not None
        ]
        self.events.listed(self.role, named)
        self.resource_version = pods.version
        return pods.version

    async def _watch(self, version: str) -> tuple[str, bool]:
        """Report events until the stream ends; return the last version and whether the
        stream proved healthy (an event arrived, or it stayed open for a while)."""
        opened = time.monotonic()
        count = 0
        stream = self.api.watch_pods(self.namespace, self.selector, version, self.watch_timeout)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                version = self._event(event, version)
                self.resource_version = version
                count += 1
        return version, count > 0 or time.monotonic() - opened >= HEALTHY_WATCH_SECONDS

    def _event(self, event: Any, version: str) -> str:
        """Report one watch event; return the resourceVersion to resume from."""
        if not isinstance(event, Mapping):
            raise ApiError(200, "watch event is not an object")
        kind = event.get("type")
        obj = as_mapping(event.get("object"))
        if kind == "ERROR":  # the server's way to refuse a watch it already accepted
            code = obj.get("code")
            if code == 410:
                raise ApiGone(obj.get("message"))
            raise ApiError(code if isinstance(code, int) else 0, str(obj.get("message")))
        name = pod_name(obj)
        if kind in ("ADDED", "MODIFIED") and name is not None:
            self.events.changed(self.role, name, obj)
        elif kind == "DELETED" and name is not None:
            self.events.deleted(self.role, name)
        elif kind != "BOOKMARK":
            log.debug("kubernetes %s watch: ignored event %r", self.role, kind)
        return pod_version(obj) or version


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _hint(exc: Exception) -> str:
    if isinstance(exc, ApiError) and exc.status in (401, 403):
        return (
            " (the proxy's service account needs get, list and watch on pods in this "
            "namespace: a Role and RoleBinding)"
        )
    return ""
