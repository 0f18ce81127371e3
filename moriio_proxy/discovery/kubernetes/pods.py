"""The pod rules: which pod stands for which instance, and why a pod is refused.

Pure functions over the JSON dicts the API server sends (no I/O, no kubernetes-asyncio),
so they are tested without a cluster. The annotations are the contract with the deploy
manifests (deploy/kubernetes), which label and annotate every vLLM pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...protocol import TRANSFER_MODES, Instance, RegistrationError, Role, parse_registration

HTTP_PORT = "moriio.io/http-port"
HANDSHAKE_PORT = "moriio.io/handshake-port"
NOTIFY_PORT = "moriio.io/notify-port"
DP_SIZE = "moriio.io/dp-size"
TP_SIZE = "moriio.io/tp-size"
TRANSFER_MODE = "moriio.io/transfer-mode"
ANNOTATIONS = (HTTP_PORT, HANDSHAKE_PORT, NOTIFY_PORT, DP_SIZE, TP_SIZE, TRANSFER_MODE)


class PodRejected(ValueError):
    """A Ready pod whose annotations cannot describe an instance; names the culprit."""

    def __init__(self, annotation: str, detail: str) -> None:
        super().__init__(f"{annotation}: {detail}")
        self.annotation = annotation
        self.detail = detail


def pod_instance(role: Role, pod: Mapping[str, Any]) -> Instance | None:
    """The instance a pod stands for, or None while it must not receive traffic.

    None for a pod that is terminating, has no IP yet, or is not Ready (a vLLM pod is
    Ready once its model is loaded and it answers). A Ready pod with missing or invalid
    annotations raises PodRejected naming the annotation. The final check is
    ``parse_registration`` on the vLLM 0.32 heartbeat map, so a pod is held to exactly
    the rules a heartbeat is.
    """
    meta = as_mapping(pod.get("metadata"))
    status = as_mapping(pod.get("status"))
    if meta.get("deletionTimestamp"):
        return None
    ip = status.get("podIP")
    if not ip or not isinstance(ip, str) or not _is_ready(status):
        return None
    annotations = as_mapping(meta.get("annotations"))
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


def pod_name(pod: Mapping[str, Any]) -> str | None:
    name = as_mapping(pod.get("metadata")).get("name")
    return name if isinstance(name, str) and name else None


def pod_version(pod: Mapping[str, Any]) -> str | None:
    """The object's resourceVersion, where a watch resumes after it."""
    version = as_mapping(pod.get("metadata")).get("resourceVersion")
    return version if isinstance(version, str) and version else None


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one: the API's JSON is untrusted."""
    return value if isinstance(value, Mapping) else {}


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
