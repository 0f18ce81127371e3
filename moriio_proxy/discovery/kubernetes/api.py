"""The Kubernetes API as discovery uses it: credentials, then a typed pod list and watch.

Only this module imports ``kubernetes_asyncio`` (``pip install 'moriio-proxy[k8s]'``).
The client supplies credentials (in-cluster service account with token rotation,
kubeconfig with exec plugins), TLS and the request plumbing; the list and the event
stream are read raw, as JSON dicts, so every reconnect, 410 and error is ours to see.

Reading raw means ``_preload_content=False``, with which the generated client returns
the unread aiohttp response although its stubs promise a ``V1PodList``. ``_unread``
checks the real type at run time, so everything past it is typed against what actually
comes back, without casts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

try:
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config
    from kubernetes_asyncio.config.kube_config import KubeConfigLoader
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "Kubernetes discovery needs the kubernetes-asyncio package: pip install 'moriio-proxy[k8s]'"
    ) from exc

from ... import __version__
from ...tasks import BackgroundTasks
from .pods import as_mapping

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
LIST_TIMEOUT = 30.0  # total seconds for one list
CONNECT_TIMEOUT = 10.0


class KubernetesConfigError(OSError):
    """No way to reach the Kubernetes API (no service account, no kubeconfig).

    An OSError so the CLI reports it as one line, like a discovery port already taken.
    """


class ApiGone(Exception):
    """HTTP 410: the resourceVersion left the API server's history; only a re-list helps."""


class ApiError(Exception):
    """Any other refusal from the API server (status code and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class PodList:
    """One consistent list: its resourceVersion and the items as sent (untrusted JSON)."""

    version: str
    items: list[Any]


class PodApi:
    """The two calls discovery makes: list the pods a selector matches, and watch them."""

    def __init__(self, client: k8s_client.ApiClient) -> None:
        self._client = client
        self._core = k8s_client.CoreV1Api(client)

    @property
    def host(self) -> str | None:
        return self._client.configuration.host

    async def list_pods(self, namespace: str, selector: str) -> PodList:
        response = _unread(
            await self._core.list_namespaced_pod(
                namespace,
                label_selector=selector,
                _preload_content=False,
                _request_timeout=LIST_TIMEOUT,
            )
        )
        try:
            await _check_status(response)
            body = await response.json(content_type=None)
        finally:
            response.release()
        items = body.get("items", []) if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            raise ApiError(response.status, "the pod list is not a PodList")
        version = as_mapping(body.get("metadata")).get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise ApiError(response.status, "the pod list has no resourceVersion")
        return PodList(version, items)

    async def watch_pods(
        self, namespace: str, selector: str, version: str, timeout: float
    ) -> AsyncGenerator[Any, None]:
        """The watch events after ``version``, parsed, until the stream ends.

        The server ends the watch after ``timeout`` seconds; silence well past that
        means a dead connection (a partition sends no RST), hence the read timeout.
        Iterate inside ``contextlib.aclosing`` so the response is closed at once
        when the consumer stops early.
        """
        response = _unread(
            await self._core.list_namespaced_pod(
                namespace,
                label_selector=selector,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(timeout)),
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, timeout + 30),
            )
        )
        try:
            await _check_status(response)
            while line := await response.content.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            response.close()

    async def close(self) -> None:
        await self._client.close()


async def connect(
    *,
    api_url: str | None,
    kubeconfig: str | None,
    context: str | None,
    tasks: BackgroundTasks,
) -> PodApi:
    """Load credentials; raise KubernetesConfigError at once when there are none.

    ``api_url``: an API server reached without credentials (``kubectl proxy``, tests);
    without it, the in-cluster service account when running in a pod, else kubeconfig
    (``kubeconfig`` file and ``context``; default ``$KUBECONFIG`` or ``~/.kube/config``),
    whose expiring tokens are refreshed by a task spawned in ``tasks``.
    """
    configuration = k8s_client.Configuration()
    try:
        if api_url:
            configuration.host = api_url.rstrip("/")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            _load_incluster_config(configuration)
        else:
            loader = await k8s_config.load_kube_config(
                config_file=kubeconfig,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
            # Refreshes exec-plugin and GCP tokens; returns at once for static ones.
            tasks.spawn(_refresh_token(loader, configuration), name="k8s-token-refresh")
    except Exception as exc:
        raise KubernetesConfigError(
            f"cannot load Kubernetes API credentials ({exc}); run in a pod with a "
            "service account, set KUBECONFIG, or give the API URL (e.g. kubectl proxy)"
        ) from None
    client = k8s_client.ApiClient(configuration=configuration)
    client.user_agent = f"moriio-proxy/{__version__}"  # names us in the API audit log
    return PodApi(client)


def own_namespace() -> str:
    """The pod's own namespace in a cluster (the service account says), else "default"."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _load_incluster_config(configuration: k8s_client.Configuration) -> None:
    # kubernetes_asyncio leaves this function unannotated; its documented signature
    # (keyword ``client_configuration``, returns None) is declared here once.
    load: Callable[..., None] = k8s_config.load_incluster_config
    load(client_configuration=configuration)


async def _refresh_token(loader: KubeConfigLoader, configuration: k8s_client.Configuration) -> None:
    try:
        await k8s_config.refresh_token(loader, configuration)
    except Exception as exc:
        log.error("kubeconfig token refresh stopped: %r", exc)


def _unread(result: object) -> aiohttp.ClientResponse:
    """The response a ``_preload_content=False`` call really returns (see the module doc)."""
    if not isinstance(result, aiohttp.ClientResponse):
        raise TypeError(f"kubernetes-asyncio returned {type(result).__name__}, not a response")
    return result


async def _check_status(response: aiohttp.ClientResponse) -> None:
    """Raise for a non-2xx answer; ``_preload_content=False`` skips the client's check."""
    if 200 <= response.status < 300:
        return
    message = ""
    with contextlib.suppress(Exception):
        body = await response.json(content_type=None)
        message = str(as_mapping(body).get("message") or "")
    if response.status == 410:
        raise ApiGone(message)
    raise ApiError(response.status, message or response.reason or "")
