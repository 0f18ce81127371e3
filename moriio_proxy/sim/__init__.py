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
  port offsets, ``add_new_req``, block-id checks): the rules whose violation kills EngineCore.
* ``transport``: handshake / notify ROUTERs per DP rank and DEALERs to peers (ZMQ).
* ``engine``: EngineCore, per-rank KV memory and prefix cache (prompt tokens already
  computed cost nothing; ``prefill_token_latency`` per computed token, one prompt at a time
  per rank), the READ and WRITE transfer paths.
* ``api``: the OpenAI server (validation, JSON / SSE answers), its listener, ``/sim/*``.
* ``faults``: seeded fault draws and what a drawn fault does to a request.
* ``heartbeat``: the discovery heartbeat map and loop.
* ``instance``: SimInstance composing these; ``run_sim``.

Where known next steps go. Each vLLM 0.33 difference is one decision in one function, so a
``--vllm-version`` setting is read in exactly these: the WRITE decode's wait for its KV
(``engine.write.WriteTransfers.decode``; 0.33 fails it after the prefill's defer_timeout),
the READ consumer's claim on the prompt (``connector.external_prompt_tokens``; 0.33 serves a
request without do_remote_prefill as plain), WRITE-mode port arithmetic
(``connector.WriteDestination.ports``, ``connector.blocks_notify``; mixed TP), the final SSE
chunk (``api.responses.respond_stream``; 0.33 carries kv_transfer_params) and the routes
(``api.server.OpenAIServer.app``; GET /version).
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
