"""Simulated vLLM 0.32 instances running the MoRI-IO KV connector (``MoRIIOConnector``).

Why this exists: the proxy can only be trusted if it is tested against something that
behaves like vLLM 0.32, including the ways vLLM fails: a malformed leg kills the engine, a
READ decode without valid block ids answers wrong text, a WRITE decode whose prefill never
comes waits forever. The package is deliberately an independent reading of vLLM's source: it
imports nothing from the rest of ``moriio_proxy`` (a test enforces it), so a misunderstanding
in the proxy is not silently mirrored here. Users rehearse deployments on it too
(``moriio-proxy sim``, ``moriio-proxy demo``).

The parts, each mirroring vLLM 0.32's ``kv_connector/v1/moriio/`` and ``entrypoints/``
sources (the wire contract is ``docs/protocol.md``):

* ``settings``: SimConfig, SimFaults, SimStats, LegRecord (the public data).
* ``model``: the toy model; a token is a word, output is a function of the KV fingerprint.
* ``connector``: the connector's scheduler rules as pure functions (request-id sandwich,
  port offsets, ``add_new_req``, block-id checks); the one place version differences go.
* ``transport``: handshake / notify ROUTERs per DP rank and DEALERs to peers (ZMQ).
* ``engine``: EngineCore, per-rank KV memory, the READ and WRITE transfer paths.
* ``api``: the OpenAI server (validation, JSON / SSE answers), its listener, ``/sim/*``.
* ``faults``: seeded fault draws and what a drawn fault does to a request.
* ``heartbeat``: the discovery heartbeat map and loop.
* ``instance``: SimInstance composing these; ``run_sim``.
"""

from .instance import SimInstance, run_sim
from .model import EOS_MARKER, chat_prompt_text, expected_text, kv_fingerprint, normalize_prompt
from .settings import LegRecord, SimConfig, SimFaults, SimStats

__all__ = [
    "EOS_MARKER",
    "LegRecord",
    "SimConfig",
    "SimFaults",
    "SimInstance",
    "SimStats",
    "chat_prompt_text",
    "expected_text",
    "kv_fingerprint",
    "normalize_prompt",
    "run_sim",
]
