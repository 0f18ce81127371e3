"""Simulated vLLM 0.32 and 0.33 instances running the MoRI-IO KV connector (``MoRIIOConnector``).

Why this exists: the proxy can only be trusted if it is tested against something that
behaves like vLLM, including the ways vLLM fails: a malformed leg kills the engine, a READ
decode without valid block ids answers wrong text, a WRITE decode whose prefill never comes
waits forever (0.32) or, when the prefill gave up waiting for its blocks, fails (0.33).
The package is deliberately an independent reading of vLLM's source: it imports nothing
from the rest of ``moriio_proxy`` (a test enforces it), so a misunderstanding in the proxy
is not silently mirrored here. Users rehearse deployments on it too
(``moriio-proxy sim``, ``moriio-proxy demo``).

The parts, each mirroring vLLM's ``kv_connector/v1/moriio/`` and ``entrypoints/`` sources
(the wire contract is ``docs/protocol.md``):

* ``settings``: SimConfig, SimFaults, SimStats, LegRecord (the public data).
* ``model``: the toy model; a token is a word, output is a function of the KV fingerprint.
* ``connector/``: the connector's rules as pure functions, the ones whose violation kills
  EngineCore: ``addresses`` (request-id sandwich, port offsets), ``scheduler``
  (``add_new_req``), ``read`` (block-id checks), ``write``, ``messages``, ``fatal``.
* ``tp_mapping``: which prefill and decode TP sizes a transfer can map, per version.
* ``transport``: handshake / notify ROUTERs per DP rank and DEALERs to peers (ZMQ).
* ``engine``: EngineCore, per-rank KV memory and prefix cache (prompt tokens already
  computed cost nothing; ``prefill_token_latency`` per computed token, one prompt at a time
  per rank), the READ and WRITE transfer paths.
* ``api``: the OpenAI server (validation, JSON / SSE answers), its listener, ``/sim/*``.
* ``faults``: seeded fault draws and what a drawn fault does to a request.
* ``heartbeat``: the discovery heartbeat map and loop.
* ``instance``: SimInstance composing these; ``run_sim``.
* ``command``: ``moriio-proxy sim``'s arguments, turned into a ``SimConfig`` and run.

Versions. ``SimConfig.vllm_version`` ("0.32" or "0.33", default the newest) is read where
the two differ, each a decision in one function: ``GET /version`` (``api.server``); the
READ consumer's claim on a prompt without do_remote_prefill
(``connector.scheduler.external_prompt_tokens``: 0.32 answers garbage, 0.33 computes it);
TP mapping in WRITE mode (``tp_mapping``: 0.33 maps divisible sizes when both sides run it,
0.32 none);
the prefill's deferred write that never got the decode's blocks
(``engine.write.WriteTransfers._expire``: 0.33 sends write_failed) and what a decode makes
of that message (``WriteTransfers.failed``: 0.33 fails the request with a 500 or an SSE
error, 0.32's notify listener dies); ``kv_transfer_params`` in SSE chunks
(``api.responses``); hybrid models in WRITE mode (``settings.write_mode_refusal``). A prefix
cache is per DP rank state (``engine.memory.DpRank``) charged in the one place every leg
spends prompt time (``engine.runner.ModelRunner.compute_prompt``).
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
