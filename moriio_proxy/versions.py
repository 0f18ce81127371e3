"""What the proxy must know about each vLLM version behind it, as pure functions.

vLLM 0.32 and 0.33 speak the same wire contract (heartbeats, request ids, the keys of
``kv_transfer_params``), but their MoRI-IO connectors differ in what they can pair and in
how a failed KV transfer surfaces (docs/protocol.md §10). The proxy learns each instance's
version from ``GET /version`` (``version_probe``); this module turns that answer into the
decisions it drives: which prefill may be paired with which decode, and whether a failed
decode leg is a failed KV load. No I/O here, so every rule is unit-tested on its own.
"""

from __future__ import annotations

import re
from typing import Any

from .protocol import Instance, TransferMode

#: (major, minor) of a vLLM release; patch levels do not change the connector's behaviour.
Release = tuple[int, int]

OLDEST: Release = (0, 32)  # the oldest supported release; an unknown version counts as it
WRITE_TP_MAPPING: Release = (0, 33)  # WRITE mode maps different TP sizes; write_failed
SUPPORTED = ("0.32", "0.33")

# PEP 440: the release numbers lead; builds add "rc1", ".dev5", "+rocm7.1" after them.
_RELEASE_RE = re.compile(r"\s*v?(\d{1,4})\.(\d{1,4})")
_MAX_VERSION_LEN = 128

# What vLLM 0.33 answers for a request the engine finished with an error (a failed KV load
# among them): docs/protocol.md §7.6. An engine death reads differently.
_KV_LOAD_MESSAGE = "Internal server error"


def parse_version_answer(payload: Any) -> str | None:
    """The version string of a ``GET /version`` answer (``{"version": "0.33.0"}``), or None
    when the answer is not that shape or names no release the proxy can read."""
    if not isinstance(payload, dict):
        return None
    text = payload.get("version")
    if not isinstance(text, str) or len(text) > _MAX_VERSION_LEN:
        return None
    return text.strip() if parse_release(text) is not None else None


def parse_release(text: str | None) -> Release | None:
    """The leading ``major.minor`` of a version string; None when it has none."""
    if not text:
        return None
    match = _RELEASE_RE.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def effective(release: Release | None) -> Release:
    """The release whose behaviour the proxy assumes: unknown (and anything older than
    the oldest supported release) is treated as the oldest supported, the safe choice."""
    if release is None or release < OLDEST:
        return OLDEST
    return release


def maps_write_tp(release: Release | None) -> bool:
    """Whether the instance's connector has 0.33's WRITE-mode TP mapping and, with it, the
    ``write_failed`` message (a WRITE decode whose KV cannot come fails instead of waiting)."""
    return effective(release) >= WRITE_TP_MAPPING


def label(text: str | None) -> str:
    """A version for messages: the reported string, or what an unknown one counts as."""
    if text is None:
        return f"unknown (treated as {OLDEST[0]}.{OLDEST[1]})"
    return text


def pair_problem(
    prefill: Instance,
    decode: Instance,
    mode: TransferMode,
    prefill_release: Release | None,
    decode_release: Release | None,
) -> str | None:
    """Why this prefill and this decode must not serve a request together, or None.

    Every refusal is a pair that vLLM cannot serve and that fails badly, not one request at
    a time: a wrong TP mapping kills an engine or leaves decodes waiting forever
    (docs/protocol.md §8.2, §10 rows 4, 5 and 13). Equal TP and equal versions never need
    a check, so the common homogeneous fleet costs one comparison per candidate.
    """
    p_tp, d_tp = prefill.tp_size, decode.tp_size
    if p_tp == d_tp and prefill_release == decode_release:
        return None
    p_new, d_new = maps_write_tp(prefill_release), maps_write_tp(decode_release)
    if mode == "READ":
        if p_tp != d_tp:
            return (
                f"TP {p_tp} (prefill) and {d_tp} (decode) differ: READ mode pairs only equal "
                "TP sizes (vLLM accepts others only for MLA models or fully replicated KV "
                "heads, which the proxy cannot see, and a wrong pair kills the decode engine)"
            )
        return None
    if p_new and not d_new:
        return (
            "a vLLM 0.33 prefill must not write to a decode not known to run 0.33 or "
            "later: a 0.32 decode's notify listener dies on the first write_failed "
            "message, and every later WRITE request on it waits forever"
        )
    if p_tp != d_tp:
        if not (p_new and d_new):
            return (
                f"TP {p_tp} (prefill) and {d_tp} (decode) differ: WRITE mode maps different "
                "TP sizes only when both run vLLM 0.33 or later"
            )
        if max(p_tp, d_tp) % min(p_tp, d_tp):
            return (
                f"TP {p_tp} (prefill) and {d_tp} (decode): neither divides the other, "
                "which kills the prefill engine"
            )
    return None


def is_kv_load_failure(status: int, payload: Any) -> bool:
    """Whether a decode's error answer is what vLLM 0.33 sends for a request it finished
    with an error, a failed KV load being the one a WRITE decode meets (§7.6).

    The body carries no KV-specific words, so the caller must only ask about answers where
    that is the likely cause (a WRITE decode of 0.33 or later). The serialisers space the
    JSON differently, so the parsed object is compared, never bytes.
    """
    if status != 500 or not isinstance(payload, dict):
        return False
    error = payload.get("error")
    return isinstance(error, dict) and error.get("message") == _KV_LOAD_MESSAGE
