"""The MoRI-IO P/D wire contract as pure functions.

Everything here is data in, data out: no sockets, no asyncio, no clocks, so every rule is
unit-tested without a network. The parts follow a request through the contract
(docs/protocol.md is the prose; vLLM's ``moriio`` connector is the final word):

* ``addresses``: ``IP:PORT`` and the MoRI-IO ``zmq_address`` string (docs/protocol.md §2).
* ``instance``: one announced instance, roles, modes, endpoints.
* ``registration``: heartbeat maps into instances (§2).
* ``identifiers``: transfer id, request-id sandwich, DP rank header, public ids (§3, §8.1).
* ``client``: the checks a client body passes before any upstream call (§4).
* ``legs``: the prefill and decode legs' bodies and headers (§5, §6).
* ``answers``: what the proxy writes to clients itself (§3.3, §5.2, §7.2).

Import from the package: its names are the contract's vocabulary, the modules its chapters.
"""

from .addresses import bracket_host, parse_zmq_address, split_host_port
from .answers import error_body, error_message, prefill_as_answer, rewrite_id
from .client import ClientRequest, RequestError, parse_client_request
from .identifiers import (
    DP_RANK_HEADER,
    REQUEST_ID_HEADER,
    new_request_id,
    new_transfer_id,
    public_id,
    validate_dp_rank,
)
from .instance import ROLES, TRANSFER_MODES, Endpoint, Instance, Role, Scheme, TransferMode
from .legs import (
    Leg,
    build_decode_leg,
    build_prefill_leg,
    check_read_params,
    read_decode_params,
    write_decode_params,
)
from .registration import RegistrationError, parse_registration

__all__ = [
    "DP_RANK_HEADER",
    "REQUEST_ID_HEADER",
    "ROLES",
    "TRANSFER_MODES",
    "ClientRequest",
    "Endpoint",
    "Instance",
    "Leg",
    "RegistrationError",
    "RequestError",
    "Role",
    "Scheme",
    "TransferMode",
    "bracket_host",
    "build_decode_leg",
    "build_prefill_leg",
    "check_read_params",
    "error_body",
    "error_message",
    "new_request_id",
    "new_transfer_id",
    "parse_client_request",
    "parse_registration",
    "parse_zmq_address",
    "prefill_as_answer",
    "public_id",
    "read_decode_params",
    "rewrite_id",
    "split_host_port",
    "validate_dp_rank",
    "write_decode_params",
]
