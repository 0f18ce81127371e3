"""Kubernetes discovery: every proxy replica watches the P and D pods through the API.

Behind one Service, a vLLM heartbeat reaches a single proxy replica, so the others would
never route to that instance. In Kubernetes each replica therefore lists and watches the
labelled vLLM pods itself (one ``Reflector`` per role) and keeps the registry equal to
"the Ready pods that carry valid annotations". The watch is the liveness signal:
instances are registered ``static`` (no heartbeat TTL) and removed when their pod turns
unready, is deleted, or vanishes from a re-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ...config import DEFAULT_DECODE_SELECTOR, DEFAULT_PREFILL_SELECTOR
from ...metrics import Metrics
from ...protocol import Instance, Role
from ...registry import Registry
from ..base import DiscoverySource
from .api import PodApi, connect, own_namespace
from .pods import TRANSFER_MODE, PodRejected, pod_instance, pod_version
from .reflector import Reflector

log = logging.getLogger(__name__)

REJECT_REASON = "k8s_bad_annotations"  # registrations_rejected label
ROLES: tuple[Role, Role] = ("P", "D")

# How to fix a mode conflict between pods (ends the REFUSED line).
_REMEDY = f"P and D pods must carry the same {TRANSFER_MODE} annotation (and vLLM read_mode)"


class KubernetesDiscovery(DiscoverySource):
    """Feeds the registry from the API server's view of the P and D pods.

    ``ready`` is set once both roles have been listed successfully.
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        namespace: str | None = None,
        prefill_selector: str = DEFAULT_PREFILL_SELECTOR,
        decode_selector: str = DEFAULT_DECODE_SELECTOR,
        api_url: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        static: Sequence[Instance] = (),
        watch_timeout: float = 300.0,
        resync_interval: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        """Nothing touches the network until ``start()``.

        ``namespace``: where the vLLM pods live; None or "" means the proxy's own.
        ``api_url``, ``kubeconfig``, ``context``: where the credentials come from (see
        ``api.connect``). ``watch_timeout``: seconds the API server keeps one watch
        open before it is resumed. ``resync_interval``: seconds between re-applications
        of the desired instances, which retries a pod refused for a mode conflict once
        the conflict is gone (no heartbeat would retry it).
        """
        super().__init__(registry, metrics, static=static, logger=log)
        self.namespace = namespace or None
        self.selectors: dict[Role, str] = {"P": prefill_selector, "D": decode_selector}
        self.api_url = api_url
        self.kubeconfig = kubeconfig
        self.context = context
        self.watch_timeout = watch_timeout
        self.resync_interval = resync_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ready = asyncio.Event()
        self._reflectors: dict[Role, Reflector] = {}
        self._desired: dict[Role, dict[str, Instance]] = {"P": {}, "D": {}}
        self._rejected: dict[tuple[Role, str], str | None] = {}
        self._listed: set[Role] = set()
        self._static_keys = frozenset(i.key for i in self.static)
        self._api: PodApi | None = None

    @property
    def resource_versions(self) -> dict[Role, str | None]:
        """The last resourceVersion processed per role (for debugging and tests)."""
        return {
            role: reflector.resource_version if (reflector := self._reflectors.get(role)) else None
            for role in ROLES
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load credentials (fails fast with KubernetesConfigError), then start watching.

        Does not wait for the API server: an unreachable one is retried in the
        background, and ``ready`` tells when the first lists have arrived.
        """
        self.register_static()
        self._api = api = await connect(
            api_url=self.api_url,
            kubeconfig=self.kubeconfig,
            context=self.context,
            tasks=self._tasks,
        )
        if self.namespace is None:
            self.namespace = own_namespace()
        for role in ROLES:
            reflector = Reflector(
                api,
                role,
                self.namespace,
                self.selectors[role],
                self,
                watch_timeout=self.watch_timeout,
                backoff_initial=self.backoff_initial,
                backoff_max=self.backoff_max,
            )
            self._reflectors[role] = reflector
            self._tasks.spawn(reflector.run(), name=f"k8s-watch-{role}")
        self._tasks.spawn(self._resync(), name="k8s-resync")
        log.info(
            "kubernetes discovery: watching pods in namespace %s (prefill %r, decode %r) via %s",
            self.namespace,
            self.selectors["P"],
            self.selectors["D"],
            api.host,
        )

    async def stop(self) -> None:
        """Cancel the watches and close the API client; registered instances stay."""
        await self._tasks.cancel_all()
        if self._api is not None:
            api, self._api = self._api, None
            with contextlib.suppress(Exception):
                await api.close()

    # ------------------------------------------------ what the reflectors report

    def listed(self, role: Role, pods: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Make the registry match one consistent list (sync by diff)."""
        present: set[str] = set()
        for name, pod in pods:
            present.add(name)
            self._apply(role, name, pod)
        for name in set(self._desired[role]) - present:
            self._forget(role, name, "pod_gone")
        for key in [k for k in self._rejected if k[0] == role and k[1] not in present]:
            del self._rejected[key]
        self._listed.add(role)
        if len(self._listed) == 2 and not self.ready.is_set():
            self.ready.set()
            log.info("kubernetes discovery synced: %d P, %d D pods ready", *self._counts())

    def changed(self, role: Role, name: str, pod: Mapping[str, Any]) -> None:
        self._apply(role, name, pod)

    def deleted(self, role: Role, name: str) -> None:
        self._forget(role, name, "pod_deleted")

    # -------------------------------------------------------------- registry sync

    def _apply(self, role: Role, name: str, pod: Mapping[str, Any]) -> None:
        """Make the registry reflect one pod's current state; never raises."""
        try:
            try:
                instance = pod_instance(role, pod)
            except PodRejected as exc:
                self._reject(role, name, pod, exc)
                self._forget(role, name, "pod_bad_annotations")
                return
            self._rejected.pop((role, name), None)
            if instance is None:
                self._forget(role, name, "pod_not_ready")
                return
            old = self._desired[role].get(name)
            self._desired[role][name] = instance
            if old is not None and old.key != instance.key:
                self._release(old.key, "pod_moved")
            self._register(instance)
        except Exception as exc:  # a bug on one pod must not stop the watch
            self.metrics.registrations_rejected.labels("internal_error").inc()
            self._log(logging.ERROR, f"k8s-bug:{name}", "pod %s not applied: %r", name, exc)

    def _forget(self, role: Role, name: str, reason: str) -> None:
        old = self._desired[role].pop(name, None)
        if old is not None:
            self._release(old.key, reason)

    def _release(self, key: tuple[Role, str], reason: str) -> None:
        """Remove an instance unless config or another pod still claims its address."""
        if key in self._static_keys:
            return
        for instance in self._desired[key[0]].values():
            if instance.key == key:  # e.g. a restarted pod on hostNetwork, same node
                self._register(instance)
                return
        self.registry.remove(key, reason=reason)

    def _register(self, instance: Instance) -> None:
        self._upsert(instance, static=True, remedy=_REMEDY)

    def _reject(self, role: Role, name: str, pod: Mapping[str, Any], exc: PodRejected) -> None:
        """Count and log a bad pod once per pod version, so a re-list does not recount."""
        version = pod_version(pod)
        if (role, name) in self._rejected and self._rejected[(role, name)] == version:
            return
        self._rejected[(role, name)] = version
        self.metrics.registrations_rejected.labels(REJECT_REASON).inc()
        self._log(
            logging.WARNING,
            f"k8s-bad:{role}:{name}",
            "pod %s/%s (%s) skipped: annotation %s %s",
            self.namespace,
            name,
            "prefill" if role == "P" else "decode",
            exc.annotation,
            exc.detail[:200],
        )

    async def _resync(self) -> None:
        """Re-apply the desired instances now and then, as a heartbeat would.

        Retries pods refused for a mode conflict once the other mode is gone, and
        restores any entry removed from the registry behind our back.
        """
        while True:
            await asyncio.sleep(self.resync_interval)
            for role in ROLES:
                for instance in list(self._desired[role].values()):
                    try:
                        self._register(instance)
                    except Exception as exc:
                        self._log(logging.ERROR, "k8s-resync", "resync failed: %r", exc)

    def _counts(self) -> tuple[int, int]:
        return len(self._desired["P"]), len(self._desired["D"])
