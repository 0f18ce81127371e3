"""How the connector pairs TP ranks of a prefill and a decode of different TP sizes, per
vLLM version, as pure functions (vLLM 0.33 added ``moriio_tp_mapping.py`` for WRITE mode).

A simulated instance is one engine standing for all its TP ranks, so these rules decide,
from the sizes and versions involved, whether a transfer would reach every rank it must:

* WRITE, 0.33 on both sides: one TP size must divide the other (else the prefill's engine
  dies inside its forward); each side must name the other's real TP size on its leg
  (``remote_tp_size``): the decode sends its block allocation to that many prefill ranks,
  the prefill maps its writes onto that many decode ranks.
* WRITE with a 0.32 side and different sizes: 0.32 has no mapping (each rank writes its
  whole shard to one decode rank, notifies by its own rank), and a 0.32 decode sends no
  KV-head layouts for a 0.33 prefill to slice by: decode ranks nobody writes wait forever.
* READ (0.32 and 0.33): different sizes work only for MLA models or KV heads replicated on
  both sides; the simulated model is neither, so the decode's engine dies, as vLLM's does.

What a real prefill learns from the decode's handshake metadata and from which of its own
ranks received the allocation, the simulator carries in ``sim_`` fields of the decode's
"remote_blocks" message (``DecodeFacts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def peer_tp(kv: dict[str, Any], local_tp: int) -> int:
    """The peer's TP size a leg names: ``remote_tp_size``, else ``tp_size``; absent or 0
    means "the same as mine" (0.33 get_moriio_peer_tp_size)."""
    for key in ("remote_tp_size", "tp_size"):
        try:
            value = int(kv.get(key) or 0)
        except (TypeError, ValueError):
            value = 0
        if value > 0:
            return value
    return local_tp


def write_tp_refusal(version: str, local_tp: int, decode_tp: int) -> str | None:
    """A 0.33 prefill's validate_write_tp_topology, run in save_kv_layer: its ValueError is
    raised inside the forward, which kills the engine. 0.32 checks nothing."""
    if version == "0.32" or decode_tp == local_tp:
        return None
    if max(local_tp, decode_tp) % min(local_tp, decode_tp):
        return (
            f"prefill TP {local_tp} and decode TP {decode_tp}: one TP size must divide the "
            "other (ValueError in validate_write_tp_topology, raised inside the forward)"
        )
    return None


def allocation_fanout(version: str, local_tp: int, kv: dict[str, Any]) -> int:
    """How many prefill TP ranks a decode sends its block allocation to: 0.33 the prefill
    TP its leg names, 0.32 its own TP."""
    return peer_tp(kv, local_tp) if version != "0.32" else local_tp


@dataclass(frozen=True)
class DecodeFacts:
    """What a prefill knows of the decode that allocated: its real TP size, its version
    (whether its handshake carries KV-head layouts) and how many prefill ranks the
    allocation reached."""

    tp_size: int
    vllm_version: str
    fanout: int

    def fields(self) -> dict[str, Any]:
        """The ``sim_`` fields of a "remote_blocks" message."""
        return {
            "sim_tp_size": self.tp_size,
            "sim_vllm_version": self.vllm_version,
            "sim_fanout": self.fanout,
        }

    @classmethod
    def of(cls, message: dict[str, Any], prefill_tp: int, prefill_version: str) -> DecodeFacts:
        """Read them back; a message without them (a hand-built one) stands for a decode
        that matches the prefill."""
        tp = message.get("sim_tp_size")
        version = message.get("sim_vllm_version")
        fanout = message.get("sim_fanout")
        return cls(
            tp_size=tp if isinstance(tp, int) and tp > 0 else prefill_tp,
            vllm_version=version if isinstance(version, str) else prefill_version,
            fanout=fanout if isinstance(fanout, int) and fanout > 0 else prefill_tp,
        )


def missing_allocation(local_tp: int, facts: DecodeFacts) -> str | None:
    """Why some of this prefill's TP ranks never get the decode's allocation (they then
    wait for it until defer_timeout), or None when every rank gets it."""
    if facts.fanout >= local_tp:
        return None
    return (
        f"the decode sent its block allocation to {facts.fanout} prefill TP rank(s) but this "
        f"prefill runs TP {local_tp}: the other ranks never get it"
    )


def write_problem(version: str, local_tp: int, leg_tp: int, facts: DecodeFacts) -> str | None:
    """Why this prefill's write cannot reach every rank of the decode (which then waits
    for its KV forever: nothing tells it), or None when the write lands.

    ``leg_tp`` is the decode TP the prefill's own leg names.
    """
    if facts.tp_size != leg_tp:
        return (
            f"the prefill leg names decode TP {leg_tp} but the decode runs TP "
            f"{facts.tp_size}: the writes go to the wrong decode ranks"
        )
    if facts.tp_size == local_tp:
        return None
    if version == "0.32":
        return (
            f"vLLM 0.32 has no WRITE TP mapping (prefill TP {local_tp}, decode TP "
            f"{facts.tp_size}): decode ranks nobody writes wait forever"
        )
    if facts.vllm_version == "0.32":
        return (
            "a vLLM 0.32 decode sends no KV-head layouts in its handshake: the 0.33 write "
            "thread raises MoRIIOError and marks the transfer done"
        )
    return None


def read_tp_refusal(local_tp: int, prefill_tp: int) -> str | None:
    """A READ decode's get_moriio_remote_tp_rank and KV-head check, raised inside the step
    (the engine dies): the simulated model is neither MLA nor has replicated KV heads."""
    if prefill_tp == local_tp:
        return None
    if max(local_tp, prefill_tp) % min(local_tp, prefill_tp):
        why = "one TP size must divide the other (ValueError in get_moriio_remote_tp_rank)"
    else:
        why = (
            "different TP sizes need an MLA model or KV heads replicated on both sides "
            "(NotImplementedError in validate_moriio_heterogeneous_tp_kv_heads)"
        )
    return f"prefill TP {prefill_tp} and decode TP {local_tp}: {why}"
