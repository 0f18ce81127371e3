"""What a discovery source is, and what every source shares.

A source feeds the registry between ``start()`` and ``stop()``: vLLM's ZMQ heartbeats
(``zmq.Discovery``) or the Kubernetes API's view of the pods
(``kubernetes.source.KubernetesDiscovery``). The app holds exactly one and knows only
this interface. Both also register the config file's static instances, and both refuse
an instance whose transfer mode disagrees with the one in force in the same loud,
rate-limited way, so that rule lives here once.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence

from ..admin.actions import Action, Outcome, apply_action
from ..metrics import Metrics
from ..protocol import Instance
from ..registry import Entry, Registry, UpsertResult
from ..tasks import BackgroundTasks


class RateLimitedLog:
    """At most one line per key per interval, with a count of what it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, level: int, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1024:  # bounded even under a flood of distinct keys
            self._last.clear()
        suffix = f" ({held} similar messages suppressed)" if held else ""
        self._logger.log(level, message + suffix, *args)


log = logging.getLogger("moriio_proxy.discovery")


def _log_added(_sender: object, entry: Entry, **_: object) -> None:
    inst = entry.instance
    log.info(
        "registered %s instance %s (%s, dp=%d, tp=%d, %s)",
        inst.role,
        inst.http_address,
        inst.zmq_address,
        inst.dp_size,
        inst.tp_size,
        inst.transfer_mode,
    )


class DiscoverySource(abc.ABC):
    """One way of finding instances; registers ``static`` first, then what it discovers.

    ``bound_port`` is the port a listening source bound (the real one when asked for
    port 0), and None for a source that listens on nothing. A source that ``announce``s
    is the fleet's source of truth: it logs every instance that comes and goes and counts
    departures (``moriio_proxy_evictions_total``); a worker's mirror does neither.
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        static: Sequence[Instance],
        logger: logging.Logger,
        announce: bool = True,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.static = tuple(static)
        self.announce = announce
        self.bound_port: int | None = None
        self._tasks = BackgroundTasks()
        self._log = RateLimitedLog(logger)
        if announce:  # the source of truth logs and counts arrivals and departures
            registry.instance_added.connect(_log_added, sender=registry, weak=False)
            registry.instance_removed.connect(self._removed, sender=registry, weak=False)

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin feeding the registry; an OSError is a setup failure the CLI reports."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop feeding the registry (idempotent); the registered instances stay."""

    async def administer(self, action: Action) -> Outcome:
        """Apply an operator's action where the registry's truth lives: this process.
        (A worker's mirror forwards it to its supervisor instead.)"""
        return apply_action(self.registry, action)

    def register_static(self) -> None:
        """Add the config file's instances (never evicted); refuse loudly those in the
        wrong mode. They are not counted: the metrics count what was discovered."""
        for instance in self.static:
            if self.registry.upsert(instance, static=True) == "conflict":
                self._log_conflict(
                    instance,
                    "a static instance from the config file, ignored; every instance "
                    "must use the transfer mode in force",
                )

    def _upsert(self, instance: Instance, *, static: bool, remedy: str) -> UpsertResult:
        """Register a discovered instance and count the outcome. A mode conflict is
        refused with a log line that ends in ``remedy``: how to fix it at this source."""
        result = self.registry.upsert(instance, static=static)
        if result == "conflict":
            self.metrics.registrations_rejected.labels("mode_conflict").inc()
            self._log_conflict(instance, remedy)
        else:
            self.metrics.registrations.labels(result).inc()
        return result

    def _removed(self, _sender: object, entry: Entry, reason: str = "", **_: object) -> None:
        inst = entry.instance
        self.metrics.evictions.labels(inst.role).inc()
        log.warning("removed %s instance %s: %s", inst.role, inst.http_address, reason)

    def _log_conflict(self, instance: Instance, remedy: str) -> None:
        self._log(
            logging.ERROR,
            f"conflict:{instance.key}",
            "REFUSED %s instance %s: transfer_mode %s disagrees with %s in force; %s",
            instance.role,
            instance.http_address,
            instance.transfer_mode,
            self.registry.mode,
            remedy,
        )
