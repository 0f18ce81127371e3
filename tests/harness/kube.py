"""A fake Kubernetes API server for pods: list and watch with resourceVersions.

Just enough of the real thing for discovery tests to exercise what breaks informers in
production: events replayed from a resourceVersion, 410 Gone once history is compacted,
streams that end cleanly or drop mid-flight, API errors, and label selectors (a pod that
stops matching is a DELETED event to that watch, as the real watch cache sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import Any

from aiohttp import web

from .waiting import STATE_TIMEOUT, eventually

Pod = dict[str, Any]


def make_pod(
    name: str,
    role: str = "prefill",
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    http: Any = 20005,
    handshake: Any = 6301,
    notify: Any = 6105,
    dp: Any = 1,
    tp: Any = 1,
    mode: Any = "READ",
    deleting: bool = False,
    drop: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
) -> Pod:
    """A vLLM pod as the deploy manifests describe it (``drop`` removes annotations)."""
    annotations = {
        "moriio.io/http-port": str(http),
        "moriio.io/handshake-port": str(handshake),
        "moriio.io/notify-port": str(notify),
        "moriio.io/dp-size": str(dp),
        "moriio.io/tp-size": str(tp),
        "moriio.io/transfer-mode": str(mode),
    }
    for key in drop:
        annotations.pop(f"moriio.io/{key}")
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "moriio",
        "uid": f"uid-{name}",
        "labels": labels
        if labels is not None
        else {"app.kubernetes.io/name": "vllm-moriio", "moriio.io/role": role},
        "annotations": annotations,
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status}


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeAPI:
    """Pods in one namespace, an event history, and knobs for the test to turn."""

    def __init__(self, namespace: str = "moriio") -> None:
        self.namespace = namespace
        self.pods: dict[str, Pod] = {}
        self.version = 1000
        # (resourceVersion, object before, object after); after is None for a deletion.
        self.history: list[tuple[int, Pod | None, Pod | None]] = []
        self.compacted = 0  # a watch from a version below this gets 410 Gone
        self.list_calls = 0
        self.authorization: str | None = None  # the last Authorization header seen
        self.watch_calls = 0
        self.list_failures: list[int] = []  # HTTP statuses for the next lists
        self.watch_failures: list[int] = []  # HTTP statuses for the next watches
        self.gone_as_http = False  # 410 as an HTTP status instead of an ERROR event
        self.lists_open = asyncio.Event()  # clear it to hold lists until set again
        self.watches_open = asyncio.Event()  # the same for watches
        self.lists_open.set()
        self.watches_open.set()
        self._streams: list[int] = []  # the generation of each open watch stream
        self._changed = asyncio.Condition()
        self._generation = 0  # bumped to end every open stream
        self._abort = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        await self.drop_watches(abort=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # --------------------------------------------------------------- controls

    async def put(self, pod: Pod) -> int:
        """Create or replace a pod (ADDED or MODIFIED); return its new resourceVersion."""
        pod = copy.deepcopy(pod)
        name = pod["metadata"]["name"]
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        before = self.pods.get(name)
        self.pods[name] = pod
        self.history.append((self.version, before, pod))
        await self._notify()
        return self.version

    async def delete(self, name: str) -> int:
        before = self.pods.pop(name)
        self.version += 1
        gone = copy.deepcopy(before)
        gone["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, gone, None))
        await self._notify()
        return self.version

    def compact(self) -> None:
        """Forget the history: any watch resuming from an older version gets 410."""
        self.compacted = self.version

    async def drop_watches(self, *, abort: bool) -> None:
        """End every open watch: cleanly (as on timeout) or by cutting the connection."""
        self._abort = abort
        self._generation += 1
        await self._notify()
        # Return only once they have ended, so that later changes are not sent on them.
        await eventually(
            lambda: all(g >= self._generation for g in self._streams), what="watches ended"
        )

    @property
    def active_watches(self) -> int:
        return len(self._streams)

    async def wait_watching(self, count: int, timeout: float = STATE_TIMEOUT) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.active_watches >= count)

        await asyncio.wait_for(until(), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---------------------------------------------------------------- handlers

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["namespace"] != self.namespace:
            return web.json_response(_status(404, "NotFound", "namespace not found"), status=404)
        self.authorization = request.headers.get("Authorization")
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, selector)
        self.list_calls += 1
        await self.lists_open.wait()
        if self.list_failures:
            code = self.list_failures.pop(0)
            return web.json_response(_status(code, "Failure", f"injected {code}"), status=code)
        items = [p for p in self.pods.values() if matches(selector, _labels(p))]
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, selector: str) -> web.StreamResponse:
        self.watch_calls += 1
        await self.watches_open.wait()
        if self.watch_failures:
            code = self.watch_failures.pop(0)
            return web.json_response(_status(code, "Failure", f"injected {code}"), status=code)
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        if since < self.compacted and self.gone_as_http:
            return web.json_response(_status(410, "Expired", "too old"), status=410)
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        if since < self.compacted:
            gone = {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
            await response.write(json.dumps(gone).encode() + b"\n")
            return response
        generation = self._generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        cursor = 0
        self._streams.append(generation)
        try:
            await self._notify()
            while True:
                for rv, before, after in self.history[cursor:]:
                    cursor += 1
                    if rv > since and (event := _event(selector, before, after)) is not None:
                        await response.write(json.dumps(event).encode() + b"\n")
                if self._generation != generation:
                    if self._abort and request.transport is not None:
                        request.transport.abort()  # no final chunk: the client sees a cut
                    return response
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return response
                async with self._changed:
                    if cursor == len(self.history) and self._generation == generation:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))
        finally:
            self._streams.remove(generation)


def _labels(pod: Pod) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


def _event(selector: str, before: Pod | None, after: Pod | None) -> dict[str, Any] | None:
    """What one change looks like to a watch with this selector (None: it sees nothing)."""
    was = before is not None and matches(selector, _labels(before))
    now = after is not None and matches(selector, _labels(after))
    if now and was:
        return {"type": "MODIFIED", "object": after}
    if now:
        return {"type": "ADDED", "object": after}
    if was:
        return {"type": "DELETED", "object": after if after is not None else before}
    return None
