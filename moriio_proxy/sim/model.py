"""The toy language model: deterministic text as a function of what the KV cache holds.

A token is a whitespace-separated word and the output depends only on a fingerprint of the
prompt's KV cache. A decode instance generates from the fingerprint it *received*, so a broken
KV transfer produces wrong text, as it would on hardware, while a correct one reproduces
``expected_text`` exactly: tests can tell the two apart from the answer alone.

Everything here is pure (no clock, no randomness, no I/O).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

#: A prompt containing this literal makes the simulated engine emit EOS as its first token,
#: whatever ``min_tokens`` says. It simulates an engine that ends a request early, which is
#: the only way a ``max_tokens: 1, min_tokens: 1`` prefill leg can come back with
#: ``kv_transfer_params: null`` (exercises the proxy's "P answered the whole request" path).
EOS_MARKER = "[sim:eos]"

# The words a "correct" engine outputs, and disjoint ones for garbage (an answer computed
# without valid KV): garbage can never equal expected_text for n >= 1.
VOCAB: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "basil", "cedar", "dune", "ember", "fjord",
)  # fmt: skip
GARBAGE_VOCAB: tuple[str, ...] = (
    "#qz", "#vx", "#kj", "#wq", "#zzt", "#pxq", "#jjv", "#qqk",
)  # fmt: skip


def normalize_prompt(text: str) -> str:
    """Collapse whitespace: the sim's tokenizer only sees whitespace-separated words."""
    return " ".join(text.split())


def chat_prompt_text(messages: list[dict[str, Any]]) -> str:
    """The prompt text the sim's "chat template" renders: ``"<role>: <content>\\n"`` per message.

    Public so tests can compute ``expected_text(chat_prompt_text(messages), n)``.
    """
    parts: list[str] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        parts.append(f"{msg.get('role', '')}: {content}\n")
    return "".join(parts)


def kv_fingerprint(prompt_text: str) -> str:
    """What the simulated KV cache "contains" after a prefill of this prompt."""
    return hashlib.sha256(normalize_prompt(prompt_text).encode("utf-8")).hexdigest()


def garbage_seed(prompt_text: str) -> str:
    """The seed of an answer computed without valid KV (drawn from GARBAGE_VOCAB)."""
    return "garbage:" + kv_fingerprint(prompt_text)


def ends_at_once(prompt_text: str) -> bool:
    """True when the engine emits EOS as the first token (the prompt holds EOS_MARKER)."""
    return EOS_MARKER in prompt_text


def _words(seed: str, n: int, vocab: tuple[str, ...]) -> list[str]:
    """Deterministic greedy "sampling": word k depends only on (seed, k).

    One SHAKE-256 stream per answer, four bytes a word: an extendable-output hash gives the
    same first 4k bytes whatever length is asked for, so a shorter answer is a prefix of a
    longer one, at one hash per request instead of one per token.
    """
    stream = hashlib.shake_256(seed.encode()).digest(4 * n)
    size = len(vocab)
    return [vocab[x % size] for x in struct.unpack(f">{n}I", stream)]


def expected_text(prompt_text: str, n_tokens: int) -> str:
    """What a correct engine outputs for ``prompt_text`` after exactly ``n_tokens`` tokens.

    Each token is ``" " + word``; the concatenation of streamed chunks equals this string.
    """
    return "".join(" " + w for w in _words(kv_fingerprint(prompt_text), n_tokens, VOCAB))


@dataclass(frozen=True)
class Stopping:
    """A request's early-stop settings: stop strings, ``min_tokens``, whether the stop string
    is kept in the output (``include_stop_str_in_output``)."""

    min_tokens: int = 0
    stops: tuple[str, ...] = ()
    include_stop: bool = False


@dataclass(frozen=True)
class OutputPlan:
    """The complete output of one engine request, computed up front (it is deterministic)."""

    deltas: list[str]  # streamed text per generated token (stop-string hold-back applied)
    text: str
    n_tokens: int
    finish_reason: str
    stop_reason: str | None
    length_capped: bool  # scheduler status FINISHED_LENGTH_CAPPED (decides kv_transfer_params)


def plan_output(
    seed: str, max_tokens: int, stopping: Stopping, *, eos: bool, garbage: bool = False
) -> OutputPlan:
    """Generate like vLLM 0.32's scheduler + detokenizer would.

    * EOS is checked before the length cap (v1/core/sched/utils.py check_stop), so an EOS
      first token finishes "stop" and is never length-capped; its text is empty but it
      counts as one completion token.
    * The length cap is decided by the scheduler; stop strings are found later by the
      detokenizer (v1/engine/detokenizer.py update): only once more than ``min_tokens`` tokens
      exist, searching text after the first ``min_tokens`` tokens. A stop string completing
      on the last allowed token therefore still leaves the request FINISHED_LENGTH_CAPPED
      (kv_transfer_params returned); one completing earlier aborts it (params null).
    * Streaming holds back ``max(len(stop)) - 1`` characters until the end, like vLLM.
    """
    if eos:
        return OutputPlan([""], "", 1, "stop", None, False)
    vocab = GARBAGE_VOCAB if garbage else VOCAB
    pieces = [" " + w for w in _words(seed, max_tokens, vocab)]
    stops = [s for s in stopping.stops if s]
    text = ""
    ends: list[int] = []
    final_text: str | None = None
    n_tokens = max_tokens
    finish_reason = "length"
    stop_reason: str | None = None
    length_capped = True
    for k, piece in enumerate(pieces, start=1):
        text += piece
        ends.append(len(text))
        if not stops or k <= stopping.min_tokens:
            continue
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in stops:
            start = text.find(s, max(0, len(text) + 1 - len(piece) - len(s)))
            if start != -1 and (best is None or start + len(s) < best[0]):
                best = (start + len(s), start, s)
        if best is not None:
            end, start, s = best
            final_text = text[:end] if stopping.include_stop else text[:start]
            n_tokens = k
            finish_reason = "stop"
            stop_reason = s
            length_capped = k == max_tokens
            break
    if final_text is None:
        final_text = text
    hold_back = max((len(s) for s in stops), default=1) - 1 if not stopping.include_stop else 0
    deltas: list[str] = []
    emitted = 0
    for j in range(n_tokens):
        last = j == n_tokens - 1
        visible = len(final_text) if last else min(len(final_text), ends[j] - hold_back)
        visible = max(visible, emitted)
        deltas.append(final_text[emitted:visible])
        emitted = visible
    return OutputPlan(deltas, final_text, n_tokens, finish_reason, stop_reason, length_capped)
