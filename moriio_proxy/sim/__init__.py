"""Simulated vLLM 0.32 instances running the MoRI-IO KV connector (see ``instance``)."""

from .instance import (
    EOS_MARKER,
    LegRecord,
    SimConfig,
    SimFaults,
    SimInstance,
    SimStats,
    chat_prompt_text,
    expected_text,
    kv_fingerprint,
    normalize_prompt,
    run_sim,
)

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
