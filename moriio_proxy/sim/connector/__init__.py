"""The MoRI-IO connector's rules in vLLM 0.32 and 0.33, as pure functions.

These decide what a leg's ``kv_transfer_params`` and ``X-Request-Id`` mean: which peer to
talk to, on which port, with which block ids, and which request ids match. Where the real
connector raises inside EngineCore (``add_new_req`` and friends run in the scheduler) the
rule raises ``EngineCoreFatal`` and the whole simulated engine dies, as vLLM does; where it
silently skips a transfer the rule says why, and the decode answers garbage.

The rules read vLLM 0.32's ``kv_connector/v1/moriio/`` sources (``moriio_common.py``,
``moriio_connector.py``), and 0.33's where it differs; the wire contract is
``docs/protocol.md``. A connector behaviour that differs between vLLM versions is one of
these functions, or of ``sim.tp_mapping`` (the ``sim`` package docstring lists them).
Nothing here does I/O or keeps state. The parts:

* ``fatal``: ``EngineCoreFatal``, the exception that kills the simulated engine.
* ``addresses``: the request-id sandwich, zmq addresses, ``Advertised``, port offsets.
* ``scheduler``: a leg's path and claimed tokens, ``add_new_req``, the prefill's answer.
* ``read``: a READ decode's block-id checks and the prefill rank it reads from.
* ``write``: a WRITE prefill's destination and the decode's blocks-ready target.
* ``messages``: the notify messages between connectors.
"""

from .addresses import Advertised, parse_zmq_address, peer_zmq_from_request_id, port_offset
from .fatal import EngineCoreFatal
from .messages import blocks_ready_message, notify_kind, release_message, write_failed_message
from .read import NoTransfer, ReadSource, check_remote_groups, read_source
from .scheduler import (
    LegKind,
    ReqMeta,
    add_new_req,
    adopt_transfer_id,
    external_prompt_tokens,
    leg_kind,
    prefill_answer,
)
from .write import (
    BlocksNotify,
    WriteDestination,
    blocks_notify,
    write_destination,
    write_prefill_release_target,
    write_refusal,
)

__all__ = [
    "Advertised",
    "BlocksNotify",
    "EngineCoreFatal",
    "LegKind",
    "NoTransfer",
    "ReadSource",
    "ReqMeta",
    "WriteDestination",
    "add_new_req",
    "adopt_transfer_id",
    "blocks_notify",
    "blocks_ready_message",
    "check_remote_groups",
    "external_prompt_tokens",
    "leg_kind",
    "notify_kind",
    "parse_zmq_address",
    "peer_zmq_from_request_id",
    "port_offset",
    "prefill_answer",
    "read_source",
    "release_message",
    "write_destination",
    "write_failed_message",
    "write_prefill_release_target",
    "write_refusal",
]
