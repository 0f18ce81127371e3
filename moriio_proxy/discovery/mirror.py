"""One registry, many serving processes: the supervisor's registry mirrored in each worker.

With ``serve --workers N`` only the supervisor discovers instances (the ZMQ port is bound
once; a pod watch runs once). It publishes its registry as a snapshot on every change and
at least once a second; each worker's ``MirrorSource`` applies the latest snapshot to the
worker's own registry, so every worker routes to the same instances within a heartbeat.
Liveness stays the supervisor's decision: a worker never evicts by itself, it drops what
the snapshot no longer holds. The workers report their in-flight legs back, so the
snapshot also carries the fleet-wide load that ``/admin/instances`` shows, and the vLLM
version the supervisor learned for each instance (pairing depends on it), and each
instance's drain and operator ejection.

An operator's action (admin API) that reaches a worker is forwarded to the supervisor on
the report socket, applied to its registry, and acknowledged in the snapshots that follow:
the worker answers once it applied the snapshot carrying the acknowledgement, the same
snapshot every other worker receives at that moment.

This module owns the snapshot's wire format (msgpack) on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from ..admin.actions import Action, Outcome, apply_request
from ..metrics import Metrics
from ..protocol import Instance, RegistrationError, Role, parse_registration
from ..registry import Entry, Registry
from .base import DiscoverySource

log = logging.getLogger(__name__)

# Per instance: [http_address, role] -> in-flight legs per DP rank, summed over workers.
InflightReport = dict[tuple[str, str], list[int]]
# Seconds a worker waits for the supervisor to acknowledge an operator's action.
FORWARD_TIMEOUT = 5.0
# Acknowledgements every snapshot repeats (snapshots are conflated: a worker may miss one).
_KEPT_ACKS = 64


class Acknowledgements:
    """The supervisor's side of forwarded actions: apply each, remember its outcome."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def apply(self, request: Mapping[str, Any]) -> None:
        """Apply one forwarded action (``{"id", "action", "body"}``) and keep its outcome."""
        outcome = apply_request(self.registry, str(request.get("action")), request.get("body"))
        self.recent[str(request.get("id"))] = outcome.to_wire()
        while len(self.recent) > _KEPT_ACKS:
            self.recent.popitem(last=False)


def encode_snapshot(
    registry: Registry,
    fleet_inflight: InflightReport,
    acks: Mapping[str, dict[str, Any]] | None = None,
) -> bytes:
    """The supervisor's registry as the workers apply it, with the outcomes of the actions
    workers forwarded lately (``acks``, by the id the worker gave)."""
    now = registry.clock()
    entries = []
    for entry in registry.entries():
        inst = entry.instance
        entries.append(
            {
                "type": inst.role,
                "http_address": inst.http_address,
                "zmq_address": inst.zmq_address,
                "dp_size": inst.dp_size,
                "tp_size": inst.tp_size,
                "transfer_mode": inst.transfer_mode,
                "scheme": inst.scheme,
                "static": entry.static,
                "age": now - entry.first_seen,
                "silence": now - entry.last_seen,
                "inflight": fleet_inflight.get((inst.role, inst.http_address)),
                "vllm_version": entry.vllm_version,
                "draining": entry.draining,
                # The supervisor routes nothing: its ejections are the operator's.
                "ejected_for": max(0.0, entry.ejected_until - now),
            }
        )
    snapshot = {"entries": entries, "acks": dict(acks or {})}
    packed: bytes = msgpack.packb(snapshot, use_bin_type=True)
    return packed


def apply_snapshot(registry: Registry, snapshot: Mapping[str, Any]) -> None:
    """Make ``registry`` hold exactly the snapshot's instances, with its ages and silences.

    Removals come first, so a fleet that changed transfer mode (every READ instance gone,
    a WRITE one arrived) is taken in one step without a mode conflict.
    """
    now = registry.clock()
    wanted: dict[tuple[Role, str], tuple[Instance, Mapping[str, Any]]] = {}
    for item in snapshot.get("entries", ()):
        try:
            instance = parse_registration(item)
        except RegistrationError as exc:  # our own format: a bug, not an attack
            log.error("ignoring a malformed snapshot entry: %s", exc)
            continue
        wanted[instance.key] = (instance, item)
    for gone in registry.entries():
        if gone.instance.key not in wanted:
            registry.remove(gone.instance.key, "gone from the supervisor's registry")
    for key, (instance, item) in wanted.items():
        if registry.upsert(instance, static=bool(item.get("static"))) == "conflict":
            continue  # cannot happen after the removals above; never crash a worker on it
        entry = registry.get(key)
        if entry is None:
            continue
        entry.first_seen = now - float(item.get("age", 0.0))
        entry.last_seen = now - float(item.get("silence", 0.0))
        entry.static = bool(item.get("static"))
        inflight = item.get("inflight")
        entry.fleet_inflight = tuple(int(n) for n in inflight) if inflight else None
        version = item.get("vllm_version")
        entry.set_version(version if isinstance(version, str) else None)
        entry.draining = bool(item.get("draining"))
        # The worker's own ejections (from its failed legs) stand; the operator's join them.
        ejected_for = float(item.get("ejected_for") or 0.0)
        if ejected_for > 0:
            entry.ejected_until = max(entry.ejected_until, now + ejected_for)


def local_inflight(registry: Registry) -> dict[str, list[int]]:
    """This worker's in-flight legs per instance, keyed ``ROLE http_address`` for msgpack."""
    return {
        f"{e.instance.role} {e.instance.http_address}": list(e.inflight)
        for e in registry.entries()
        if any(e.inflight)
    }


def sum_reports(reports: Mapping[int, Mapping[str, list[int]]]) -> InflightReport:
    """The supervisor's sum of every worker's latest ``local_inflight`` report."""
    total: InflightReport = {}
    for report in reports.values():
        for key, counts in report.items():
            role, _, address = key.partition(" ")
            acc = total.setdefault((role, address), [])
            if len(acc) < len(counts):
                acc.extend([0] * (len(counts) - len(acc)))
            for rank, n in enumerate(counts):
                acc[rank] += int(n)
    return total


class MirrorSource(DiscoverySource):
    """A worker's discovery: the supervisor's snapshots in, this worker's load out.

    ``start()`` waits (briefly) for the first snapshot, so a fresh worker does not answer
    "no instance" while its siblings serve.
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        snapshots: str,
        reports: str,
        worker: int,
        on_orphaned: Callable[[], None],
        report_interval: float = 1.0,
        first_snapshot_timeout: float = 3.0,
    ) -> None:
        super().__init__(registry, metrics, static=(), logger=log, announce=False)
        self.snapshots = snapshots
        self.reports = reports
        self.worker = worker
        self.on_orphaned = on_orphaned
        self.report_interval = report_interval
        self.first_snapshot_timeout = first_snapshot_timeout
        self._parent = os.getppid()
        self._ctx: zmq.asyncio.Context | None = None
        self._first = asyncio.Event()
        self._push: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[Outcome]] = {}

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.CONFLATE, 1)  # only the newest snapshot matters
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.snapshots)
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 4)  # a report nobody reads is dropped, never queued
        push.connect(self.reports)
        self._push = push
        self._tasks.spawn(self._receive(sub), name="mirror-receive")
        self._tasks.spawn(self._report(push), name="mirror-report")
        try:
            await asyncio.wait_for(self._first.wait(), self.first_snapshot_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "worker %d: no registry snapshot from the supervisor within %gs; serving "
                "with what arrives next",
                self.worker,
                self.first_snapshot_timeout,
            )

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        self._push = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def _receive(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            raw = await sub.recv()
            try:
                snapshot = msgpack.unpackb(raw, raw=False)
                apply_snapshot(self.registry, snapshot)
                self._acknowledged(snapshot.get("acks") or {})
            except Exception:  # a worker must keep serving on the last good snapshot
                log.exception("worker %d: could not apply a registry snapshot", self.worker)
                continue
            self._first.set()

    def _acknowledged(self, acks: Mapping[str, Any]) -> None:
        """Answer the forwarded actions this (already applied) snapshot acknowledges."""
        for key in [k for k in self._pending if k in acks]:
            future = self._pending.pop(key)
            if not future.done():
                future.set_result(Outcome.from_wire(acks[key]))

    async def administer(self, action: Action) -> Outcome:
        """Forward ``action`` to the supervisor, whose registry every worker mirrors, and
        answer once a snapshot acknowledging it has been applied here."""
        key = uuid.uuid4().hex
        forwarded = {"id": key, "action": action.name, "body": dict(action.body)}
        message = {"worker": self.worker, "admin": forwarded}
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            if self._push is None:
                raise asyncio.TimeoutError
            await asyncio.wait_for(self._push.send(msgpack.packb(message)), FORWARD_TIMEOUT)
            return await asyncio.wait_for(future, FORWARD_TIMEOUT)
        except asyncio.TimeoutError:
            return Outcome(
                503,
                f"the supervisor did not confirm within {FORWARD_TIMEOUT:g}s; the action may "
                "still apply: see GET /admin/instances",
            )
        finally:
            self._pending.pop(key, None)

    async def _report(self, push: zmq.asyncio.Socket) -> None:
        """Load reports, once a second; and a worker whose supervisor died (killed, so it
        could not stop its workers) shuts down rather than serve a registry nobody
        updates any more."""
        while True:
            if os.getppid() != self._parent:
                log.error("worker %d: the supervisor is gone; shutting down", self.worker)
                self.on_orphaned()
                return
            message = {"worker": self.worker, "inflight": local_inflight(self.registry)}
            # The supervisor busy or gone: drop this report, the next one will do.
            with contextlib.suppress(zmq.Again):
                await push.send(msgpack.packb(message), flags=zmq.NOBLOCK)
            await asyncio.sleep(self.report_interval)


def fleet_inflight_of(entry: Entry) -> tuple[int, ...]:
    """What ``/admin/instances`` shows as in flight: the fleet's sum when this process is a
    worker (from the snapshot), else this process's own count."""
    if entry.fleet_inflight is not None:
        return entry.fleet_inflight
    return tuple(entry.inflight)
