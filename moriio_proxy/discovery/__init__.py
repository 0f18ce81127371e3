"""How the proxy finds its vLLM instances: one source, chosen by ``--discovery``.

``base``: the interface every source implements and what they share (static instances,
the mode-conflict refusal, rate-limited logging). ``zmq``: vLLM's MoRI-IO heartbeats on
a ROUTER socket, the default. ``kubernetes``: every proxy replica watches the P and D
pods through the API; it needs the optional ``k8s`` extra (kubernetes-asyncio), so it is
imported only when selected. Sources depend on the registry, never the reverse.
"""

from __future__ import annotations

from ..config import ProxyConfig
from ..metrics import Metrics
from ..registry import Registry
from .base import DiscoverySource, RateLimitedLog
from .zmq import Discovery

__all__ = ["Discovery", "DiscoverySource", "RateLimitedLog", "make_discovery"]


def make_discovery(config: ProxyConfig, registry: Registry, metrics: Metrics) -> DiscoverySource:
    """The source ``config.discovery`` names, not started.

    Raises ImportError (with the install command) for Kubernetes discovery without the
    ``k8s`` extra; the CLI turns it into a one-line ``--discovery`` error.
    """
    if config.discovery == "kubernetes":
        from .kubernetes.source import KubernetesDiscovery

        return KubernetesDiscovery(
            registry,
            metrics,
            namespace=config.k8s_namespace or None,
            prefill_selector=config.k8s_prefill_selector,
            decode_selector=config.k8s_decode_selector,
            api_url=config.k8s_api_url or None,
            static=config.static_instances,
        )
    return Discovery(
        registry,
        metrics,
        host=config.discovery_host,
        port=config.discovery_port,
        allow=config.discovery_allow,
        static=config.static_instances,
    )
