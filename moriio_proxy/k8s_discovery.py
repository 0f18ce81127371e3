"""Kubernetes discovery: every proxy replica watches the P and D pods through the API.

Behind one Service, a vLLM heartbeat reaches a single proxy replica, so the others would
never route to that instance. In Kubernetes each replica therefore lists and watches the
labelled vLLM pods itself (list, then watch from the list's resourceVersion, the way
client-go's informers do) and keeps the registry equal to "the Ready pods that carry valid
annotations". The watch is the liveness signal: instances are registered ``static`` (no
heartbeat TTL) and removed when their pod turns unready, is deleted, or vanishes from a
re-list.

Only this module imports ``kubernetes_asyncio`` (``pip install 'moriio-proxy[k8s]'``);
the app imports it lazily when ``--discovery kubernetes`` is selected. The client supplies
credentials (in-cluster service account with token rotation, kubeconfig with exec
plugins), TLS and the request plumbing; the event stream itself is read raw, as JSON
dicts, so every reconnect, 410 and error is ours to see and handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

try:
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "Kubernetes discovery needs the kubernetes-asyncio package: pip install 'moriio-proxy[k8s]'"
    ) from exc

from . import __version__
from .discovery.base import DiscoverySource
from .metrics import Metrics
from .protocol import (
    TRANSFER_MODES,
    Instance,
    RegistrationError,
    Role,
    parse_registration,
)
from .registry import Registry

log = logging.getLogger("moriio_proxy.k8s_discovery")

# The contract with the deploy manifests (labels select, annotations describe).
DEFAULT_PREFILL_SELECTOR = "moriio.io/role=prefill"
DEFAULT_DECODE_SELECTOR = "moriio.io/role=decode"
HTTP_PORT = "moriio.io/http-port"
HANDSHAKE_PORT = "moriio.io/handshake-port"
NOTIFY_PORT = "moriio.io/notify-port"
DP_SIZE = "moriio.io/dp-size"
TP_SIZE = "moriio.io/tp-size"
TRANSFER_MODE = "moriio.io/transfer-mode"
ANNOTATIONS = (HTTP_PORT, HANDSHAKE_PORT, NOTIFY_PORT, DP_SIZE, TP_SIZE, TRANSFER_MODE)

REJECT_REASON = "k8s_bad_annotations"  # registrations_rejected label
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# A watch that delivered an event, or stayed open this long, proves the API is healthy
# again, so the reconnect backoff starts over.
_HEALTHY_WATCH_SECONDS = 10.0
_LIST_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 10.0
# How to fix a mode conflict between pods (ends the REFUSED line).
_REMEDY = f"P and D pods must carry the same {TRANSFER_MODE} annotation (and vLLM read_mode)"


class KubernetesConfigError(OSError):
    """No way to reach the Kubernetes API (no service account, no kubeconfig).

    An OSError so the CLI reports it as one line, like a discovery port already taken.
    """


class PodRejected(ValueError):
    """A Ready pod whose annotations cannot describe an instance; names the culprit."""

    def __init__(self, annotation: str, detail: str) -> None:
        super().__init__(f"{annotation}: {detail}")
        self.annotation = annotation
        self.detail = detail


class _Gone(Exception):
    """HTTP 410: the resourceVersion left the API server's history; only a re-list helps."""


class _ApiError(Exception):
    """Any other refusal from the API server (status code and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


# ------------------------------------------------------------------------ pure helpers


def pod_instance(role: Role, pod: Mapping[str, Any]) -> Instance | None:
    """The instance a pod stands for, or None while it must not receive traffic.

    None for a pod that is terminating, has no IP yet, or is not Ready (a vLLM pod is
    Ready once its model is loaded and it answers). A Ready pod with missing or invalid
    annotations raises PodRejected naming the annotation. The final check is
    ``parse_registration`` on the vLLM 0.32 heartbeat map, so a pod is held to exactly
    the rules a heartbeat is.
    """
    meta = _mapping(pod.get("metadata"))
    status = _mapping(pod.get("status"))
    if meta.get("deletionTimestamp"):
        return None
    ip = status.get("podIP")
    if not ip or not isinstance(ip, str) or not _is_ready(status):
        return None
    annotations = _mapping(meta.get("annotations"))
    missing = [name for name in ANNOTATIONS if name not in annotations]
    if missing:
        raise PodRejected(", ".join(missing), "missing")
    http = _annotation_int(annotations, HTTP_PORT, 65535)
    handshake = _annotation_int(annotations, HANDSHAKE_PORT, 65535)
    notify = _annotation_int(annotations, NOTIFY_PORT, 65535)
    dp_size = _annotation_int(annotations, DP_SIZE, None)
    tp_size = _annotation_int(annotations, TP_SIZE, None)
    mode = str(annotations[TRANSFER_MODE]).strip().upper()
    if mode not in TRANSFER_MODES:
        raise PodRejected(
            TRANSFER_MODE, f"must be READ or WRITE, got {annotations[TRANSFER_MODE]!r}"
        )
    message = {
        "type": role,
        "http_address": f"{ip}:{http}",  # IPv6 unbracketed, as vLLM sends it
        "zmq_address": f"host:{ip},handshake:{handshake},notify:{notify}",
        "dp_size": dp_size,
        "tp_size": tp_size,
        "transfer_mode": mode,
    }
    try:
        return parse_registration(message)
    except RegistrationError as exc:
        culprit = "status.podIP" if exc.reason == "bad_address" else "annotations"
        raise PodRejected(culprit, str(exc)) from None


def _is_ready(status: Mapping[str, Any]) -> bool:
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        return False
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )


def _annotation_int(annotations: Mapping[str, Any], name: str, upper: int | None) -> int:
    text = str(annotations[name]).strip()
    if not text.isdigit() or int(text) < 1 or (upper is not None and int(text) > upper):
        bound = f"1..{upper}" if upper is not None else ">= 1"
        raise PodRejected(name, f"must be an integer {bound}, got {annotations[name]!r}")
    return int(text)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _pod_name(pod: Mapping[str, Any]) -> str | None:
    name = _mapping(pod.get("metadata")).get("name")
    return name if isinstance(name, str) and name else None


def _pod_version(pod: Mapping[str, Any]) -> str | None:
    version = _mapping(pod.get("metadata")).get("resourceVersion")
    return version if isinstance(version, str) and version else None


def _own_namespace() -> str:
    """The pod's own namespace in a cluster (the service account says), else "default"."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


# ---------------------------------------------------------------------------- discovery


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
        ``api_url``: an API server reached without credentials (``kubectl proxy``,
        tests); without it, the in-cluster service account when running in a pod, else
        kubeconfig (``kubeconfig`` file and ``context``; default ``$KUBECONFIG`` or
        ``~/.kube/config``). ``watch_timeout``: seconds the API server keeps one watch
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
        # The last resourceVersion processed per role (visible for debugging and tests).
        self.resource_versions: dict[Role, str | None] = {"P": None, "D": None}
        self._desired: dict[Role, dict[str, Instance]] = {"P": {}, "D": {}}
        self._rejected: dict[tuple[Role, str], str | None] = {}
        self._listed: set[Role] = set()
        self._static_keys = frozenset(i.key for i in self.static)
        self._api: k8s_client.ApiClient | None = None
        self._core: k8s_client.CoreV1Api | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load credentials (fails fast with KubernetesConfigError), then start watching.

        Does not wait for the API server: an unreachable one is retried in the
        background, and ``ready`` tells when the first lists have arrived.
        """
        self.register_static()
        self._api = await self._connect()
        self._core = k8s_client.CoreV1Api(self._api)
        if self.namespace is None:
            self.namespace = _own_namespace()
        for role in ("P", "D"):
            self._tasks.spawn(self._run(role), name=f"k8s-watch-{role}")
        self._tasks.spawn(self._resync(), name="k8s-resync")
        log.info(
            "kubernetes discovery: watching pods in namespace %s (prefill %r, decode %r) via %s",
            self.namespace,
            self.selectors["P"],
            self.selectors["D"],
            self._api.configuration.host,
        )

    async def stop(self) -> None:
        """Cancel the watches and close the API client; registered instances stay."""
        await self._tasks.cancel_all()
        if self._api is not None:
            api, self._api, self._core = self._api, None, None
            with contextlib.suppress(Exception):
                await api.close()

    async def _connect(self) -> k8s_client.ApiClient:
        configuration = k8s_client.Configuration()
        try:
            if self.api_url:
                configuration.host = self.api_url.rstrip("/")
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                k8s_config.load_incluster_config(client_configuration=configuration)
            else:
                loader = await k8s_config.load_kube_config(
                    config_file=self.kubeconfig,
                    context=self.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
                # Refreshes exec-plugin and GCP tokens; returns at once for static ones.
                self._tasks.spawn(
                    self._refresh_token(loader, configuration), name="k8s-token-refresh"
                )
        except Exception as exc:
            raise KubernetesConfigError(
                f"cannot load Kubernetes API credentials ({exc}); run in a pod with a "
                "service account, set KUBECONFIG, or give the API URL (e.g. kubectl proxy)"
            ) from None
        api = k8s_client.ApiClient(configuration=configuration)
        api.user_agent = f"moriio-proxy/{__version__}"  # names us in the API audit log
        return api

    @staticmethod
    async def _refresh_token(loader: Any, configuration: k8s_client.Configuration) -> None:
        try:
            await k8s_config.refresh_token(loader, configuration)
        except Exception as exc:
            log.error("kubeconfig token refresh stopped: %r", exc)

    # ------------------------------------------------------------- list and watch

    async def _run(self, role: Role) -> None:
        """List, then watch from the list's version, forever; no exception ends it.

        A watch that ends cleanly (the server's timeout) is resumed from the last
        version seen. Anything else (410 Gone, an error, a dropped connection) leads to a
        re-list after a jittered backoff: the re-list removes whatever was deleted while
        we could not see it, so a lost DELETED event never leaves a ghost instance.
        """
        delay = self.backoff_initial
        version: str | None = None
        while True:
            healthy = False
            try:
                if version is None:
                    version = await self._list(role)
                version, healthy = await self._watch(role, version)
            except asyncio.CancelledError:
                raise
            except _Gone:
                log.info("kubernetes %s watch: history expired (410), re-listing", role)
                version = None
            except Exception as exc:
                version = None
                self._log(
                    logging.WARNING,
                    f"k8s-error:{role}",
                    "kubernetes %s watch failed, re-listing after backoff: %s%s",
                    role,
                    _describe(exc),
                    _hint(exc),
                )
            if healthy:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    async def _list(self, role: Role) -> str:
        """One consistent list; the registry is made to match it (sync by diff)."""
        assert self._core is not None
        response = await self._core.list_namespaced_pod(
            self.namespace,
            label_selector=self.selectors[role],
            _preload_content=False,
            _request_timeout=_LIST_TIMEOUT,  # total seconds
        )
        try:
            await _check_status(response)
            body = await response.json(content_type=None)
        finally:
            response.release()
        if not isinstance(body, Mapping) or not isinstance(body.get("items", []), list):
            raise _ApiError(response.status, "the pod list is not a PodList")
        version = _mapping(body.get("metadata")).get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise _ApiError(response.status, "the pod list has no resourceVersion")
        present: set[str] = set()
        for pod in body.get("items") or []:
            if isinstance(pod, Mapping) and (name := _pod_name(pod)) is not None:
                present.add(name)
                self._apply(role, name, pod)
        for name in set(self._desired[role]) - present:
            self._forget(role, name, "pod_gone")
        for key in [k for k in self._rejected if k[0] == role and k[1] not in present]:
            del self._rejected[key]
        self.resource_versions[role] = version
        self._listed.add(role)
        if len(self._listed) == 2 and not self.ready.is_set():
            self.ready.set()
            log.info("kubernetes discovery synced: %d P, %d D pods ready", *self._counts())
        return version

    async def _watch(self, role: Role, version: str) -> tuple[str, bool]:
        """Apply events until the stream ends; return the last version and whether the
        stream proved healthy (an event arrived, or it stayed open for a while)."""
        assert self._core is not None
        opened = time.monotonic()
        response = await self._core.list_namespaced_pod(
            self.namespace,
            label_selector=self.selectors[role],
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(self.watch_timeout)),
            _preload_content=False,
            # (connect, read): the server ends the watch at watch_timeout, so silence
            # well past it means a dead connection (a partition sends no RST).
            _request_timeout=(_CONNECT_TIMEOUT, self.watch_timeout + 30),
        )
        events = 0
        try:
            await _check_status(response)
            while True:
                line = await response.content.readline()
                if not line:
                    break
                if line.strip():
                    version = self._event(role, json.loads(line), version)
                    self.resource_versions[role] = version
                    events += 1
        finally:
            response.close()
        return version, events > 0 or time.monotonic() - opened >= _HEALTHY_WATCH_SECONDS

    def _event(self, role: Role, event: Any, version: str) -> str:
        """Apply one watch event; return the resourceVersion to resume from."""
        if not isinstance(event, Mapping):
            raise _ApiError(200, "watch event is not an object")
        kind = event.get("type")
        obj = _mapping(event.get("object"))
        if kind == "ERROR":  # the server's way to refuse a watch it already accepted
            code = obj.get("code")
            if code == 410:
                raise _Gone(obj.get("message"))
            raise _ApiError(code if isinstance(code, int) else 0, str(obj.get("message")))
        name = _pod_name(obj)
        if kind in ("ADDED", "MODIFIED") and name is not None:
            self._apply(role, name, obj)
        elif kind == "DELETED" and name is not None:
            self._forget(role, name, "pod_deleted")
        elif kind != "BOOKMARK":
            log.debug("kubernetes %s watch: ignored event %r", role, kind)
        return _pod_version(obj) or version

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
        version = _pod_version(pod)
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
            for role in ("P", "D"):
                for instance in list(self._desired[role].values()):
                    try:
                        self._register(instance)
                    except Exception as exc:
                        self._log(logging.ERROR, "k8s-resync", "resync failed: %r", exc)

    def _counts(self) -> tuple[int, int]:
        return len(self._desired["P"]), len(self._desired["D"])


async def _check_status(response: aiohttp.ClientResponse) -> None:
    """Raise for a non-2xx answer; ``_preload_content=False`` skips the client's check."""
    if 200 <= response.status < 300:
        return
    message = ""
    with contextlib.suppress(Exception):
        body = await response.json(content_type=None)
        message = str(_mapping(body).get("message") or "")
    if response.status == 410:
        raise _Gone(message)
    raise _ApiError(response.status, message or response.reason or "")


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _hint(exc: Exception) -> str:
    if isinstance(exc, _ApiError) and exc.status in (401, 403):
        return (
            " (the proxy's service account needs get, list and watch on pods in this "
            "namespace: a Role and RoleBinding)"
        )
    return ""
