"""Judging a GPU run: did KV really move, do answers match, did failures stay clean.

These are pure functions over what the processes report (Prometheus text, response bodies),
kept apart from the process handling so ``tests/gpu/test_plan.py`` checks the judgement
itself on any machine, with made-up metrics.

How "KV was transferred, not recomputed" is read from vLLM 0.32 (names checked against
``vllm/v1/metrics/loggers.py`` and ``vllm/v1/metrics/stats.py`` of vllm 0.32.0):

- ``vllm:prompt_tokens_by_source_total{source=...}``: per engine, the prompt tokens of each
  newly scheduled request split into ``local_compute`` (the engine ran the forward pass on
  them), ``local_cache_hit`` (its own prefix cache) and ``external_kv_transfer`` (the KV
  connector supplied them). On a decode instance that received the KV, almost all prompt
  tokens are ``external_kv_transfer``: MoRI-IO READ mode leaves exactly the last prompt
  token to compute, WRITE mode none. A decode that recomputed would show them as
  ``local_compute``.
- ``vllm:external_prefix_cache_hits_total`` (tokens) is the older aggregate of the same
  number; it is the fallback when the per-source counter is absent.
- ``vllm:prompt_tokens_cached_by_source_total{source="p2p"}``: MoRI-IO declares its hits
  as ``p2p`` (``MoRIIOConnector._cache_hit_source``); reported when present.

What these counters do not prove, honestly: the scheduler counts them when the connector
*claims* the tokens (at admission), not when the bytes land. A failed load is not silently
recomputed in 0.32: with the default ``kv_load_failure_policy="fail"`` the request ends with
an error. So the suite pairs the counters with greedy equality against a non-disaggregated
instance: a decode that skipped the prompt's forward pass yet produced the reference's exact
tokens must have attended over correct KV, which only the transfer could have put there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]
OutcomeKind = Literal["ok", "clean_error", "unclean"]

BY_SOURCE = "vllm:prompt_tokens_by_source_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
CACHED_BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text page as (sample name, labels, value)."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: Sequence[Sample], name: str, **labels: str) -> float | None:
    """The sum over every sample named ``name`` whose labels include ``labels``.

    Summing over the other labels adds up the engines of a DP instance. None when no
    sample has that name at all (the metric does not exist in this vLLM).
    """
    named = [s for s in samples if s[0] == name]
    if not named:
        return None
    return sum(v for _, got, v in named if all(got.get(k) == want for k, want in labels.items()))


def delta(
    before: Sequence[Sample], after: Sequence[Sample], name: str, **labels: str
) -> float | None:
    """How much a counter grew between two scrapes; None when it does not exist."""
    end = total(after, name, **labels)
    if end is None:
        return None
    return end - (total(before, name, **labels) or 0.0)


def delta_by_label(
    before: Sequence[Sample], after: Sequence[Sample], name: str, label: str
) -> dict[str, float]:
    """A counter's growth per value of ``label`` (per ``engine``: per DP rank)."""
    values = {got[label] for n, got, _ in after if n == name and label in got}
    return {v: delta(before, after, name, **{label: v}) or 0.0 for v in sorted(values)}


@dataclass(frozen=True)
class KvEvidence:
    """Where one instance's prompt tokens came from between two scrapes."""

    source: str  # the metric family read: BY_SOURCE, EXTERNAL_HITS, or "none"
    external: float  # tokens the KV connector supplied
    local_compute: float | None  # tokens the engine computed itself (None: not reported)
    local_cache_hit: float | None
    p2p: float | None

    def describe(self) -> str:
        parts = [f"external={self.external:g}"]
        if self.local_compute is not None:
            parts.append(f"local_compute={self.local_compute:g}")
        if self.local_cache_hit is not None:
            parts.append(f"local_cache_hit={self.local_cache_hit:g}")
        if self.p2p is not None:
            parts.append(f"p2p={self.p2p:g}")
        return f"{', '.join(parts)} (from {self.source})"


def kv_evidence(before_text: str, after_text: str) -> KvEvidence:
    """Read an instance's prompt-token sources from two scrapes of its /metrics."""
    before, after = parse_metrics(before_text), parse_metrics(after_text)
    p2p = delta(before, after, CACHED_BY_SOURCE, source="p2p")
    external = delta(before, after, BY_SOURCE, source="external_kv_transfer")
    if external is not None:
        return KvEvidence(
            BY_SOURCE,
            external,
            delta(before, after, BY_SOURCE, source="local_compute"),
            delta(before, after, BY_SOURCE, source="local_cache_hit"),
            p2p,
        )
    hits = delta(before, after, EXTERNAL_HITS)
    if hits is not None:
        return KvEvidence(EXTERNAL_HITS, hits, None, None, p2p)
    return KvEvidence("none", 0.0, None, None, p2p)


def kv_problems(
    decode: KvEvidence,
    prefill: KvEvidence | None,
    prompt_tokens: Sequence[int],
    block_size: int,
) -> list[str]:
    """Why the counters do not show a transfer for these requests (empty: they do).

    ``prompt_tokens`` are the prompts' lengths as the answers' ``usage`` gave them. Each
    request may lose up to one block to rounding and the recomputed last token.
    """
    wanted = sum(prompt_tokens)
    slack = len(prompt_tokens) * block_size
    problems: list[str] = []
    if decode.source == "none":
        return [
            f"decode's /metrics has neither {BY_SOURCE} nor {EXTERNAL_HITS}: this vLLM does "
            "not report where prompt tokens came from, so a transfer cannot be told from a "
            "recompute"
        ]
    if decode.external < wanted - slack:
        problems.append(
            f"decode took {decode.external:g} of {wanted} prompt tokens from the KV "
            f"connector (at least {wanted - slack} expected): it recomputed instead of "
            f"receiving the KV [{decode.describe()}]"
        )
    if decode.local_compute is not None and decode.local_compute > slack:
        problems.append(
            f"decode computed {decode.local_compute:g} prompt tokens itself (at most {slack} "
            f"expected: the last token of each request, block rounding) [{decode.describe()}]"
        )
    computed = prefill.local_compute if prefill is not None else None
    if prefill is not None and computed is not None and computed < wanted - slack:
        problems.append(
            f"prefill computed only {computed:g} of {wanted} prompt tokens: the prompts were "
            f"not prefilled there [{prefill.describe()}]"
        )
    return problems


# ------------------------------------------------------------------- greedy equality


@dataclass(frozen=True)
class Mismatch:
    index: int
    at: int  # first differing character
    expected: str
    got: str

    def describe(self) -> str:
        start = max(0, self.at - 20)
        return (
            f"prompt {self.index}: differs at character {self.at}: expected "
            f"{self.expected[start : self.at + 40]!r}, got {self.got[start : self.at + 40]!r}"
        )


def mismatches(expected: Sequence[str], got: Sequence[str]) -> list[Mismatch]:
    """The prompts whose texts differ, with where they start to differ."""
    if len(expected) != len(got):
        raise ValueError(f"{len(expected)} reference texts but {len(got)} answers")
    out = []
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want != have:
            at = next(
                (i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b),
                min(len(want), len(have)),
            )
            out.append(Mismatch(index, at, want, have))
    return out


def greedy_problem(expected: Sequence[str], got: Sequence[str], min_match: float) -> str | None:
    """None when at least ``min_match`` of the prompts match exactly, else what differs.

    Exact equality is the default. A near-tie between two tokens can in principle flip
    under different kernels (prefill split across instances vs one forward pass); the
    threshold exists for a model where that is seen, and every miss is still printed.
    """
    missed = mismatches(expected, got)
    matched = len(expected) - len(missed)
    if matched >= min_match * len(expected) - 1e-9:
        return None
    return (
        f"{matched} of {len(expected)} greedy answers equal the non-disaggregated "
        f"reference (need {min_match:.0%}): " + "; ".join(m.describe() for m in missed)
    )


# ----------------------------------------------------------------- request outcomes


def completion_text(body: Any) -> str | None:
    """``choices[0].text`` of an OpenAI completion body, or None when absent."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        text = choices[0].get("text")
        if isinstance(text, str):
            return text
    return None


def classify_outcome(status: int | None, body: Any, transport_error: str | None) -> OutcomeKind:
    """ok: an answer with text. clean_error: an HTTP error in vLLM's error shape.

    Anything else (a hang past the client's timeout, a reset connection, a 200 without
    choices, an error that is not JSON) is unclean: a client could not act on it.
    """
    if transport_error is not None or status is None:
        return "unclean"
    if status == 200:
        return "ok" if completion_text(body) is not None else "unclean"
    error = body.get("error") if isinstance(body, dict) else None
    if status >= 400 and isinstance(error, dict) and isinstance(error.get("message"), str):
        return "clean_error"
    return "unclean"


def parse_sse(raw: bytes) -> tuple[str, dict[str, Any] | None, bool, list[str]]:
    """(text, usage, saw [DONE], error messages) of a completion SSE stream."""
    text, usage, done, errors = "", None, False, []
    for line in raw.decode(errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            errors.append(f"not JSON: {data[:80]!r}")
            continue
        if isinstance(event.get("error"), dict):
            errors.append(str(event["error"].get("message")))
        piece = completion_text(event)
        if piece:
            text += piece
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
    return text, usage, done, errors
