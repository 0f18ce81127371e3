"""The toy model: prompt normalisation, the chat template, KV fingerprints and output planning
as vLLM 0.32's scheduler and detokenizer would produce it (pure functions, no sockets)."""

from __future__ import annotations

import pytest

from moriio_proxy.sim import chat_prompt_text, expected_text, kv_fingerprint, normalize_prompt
from moriio_proxy.sim.model import (
    GARBAGE_VOCAB,
    VOCAB,
    Stopping,
    ends_at_once,
    garbage_seed,
    plan_output,
)

PROMPT = "the quick brown fox jumps over the lazy dog"


def test_whitespace_does_not_change_the_prompt() -> None:
    assert normalize_prompt("  a \n b\t c ") == "a b c"
    assert kv_fingerprint("a \n b") == kv_fingerprint("a b")
    assert kv_fingerprint("a b") != kv_fingerprint("a c")


def test_chat_template_renders_role_and_text_parts() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}, "x"]},
        {"role": "assistant", "content": None},
    ]
    assert chat_prompt_text(messages) == "system: be brief\nuser: hi \nassistant: \n"


def test_expected_text_is_deterministic_words_from_the_vocabulary() -> None:
    text = expected_text(PROMPT, 6)
    assert text == expected_text(PROMPT + "  ", 6)
    assert text.startswith(" ") and len(text.split()) == 6
    assert all(w in VOCAB for w in text.split())
    assert expected_text(PROMPT, 3) == text[: len(expected_text(PROMPT, 3))]
    assert expected_text("another prompt", 6) != text


def test_length_capped_plan_matches_expected_text() -> None:
    plan = plan_output(kv_fingerprint(PROMPT), 5, Stopping(), eos=False)
    assert plan.text == expected_text(PROMPT, 5) == "".join(plan.deltas)
    assert (plan.n_tokens, plan.finish_reason, plan.stop_reason) == (5, "length", None)
    assert plan.length_capped


def test_garbage_never_equals_the_correct_answer() -> None:
    plan = plan_output(garbage_seed(PROMPT), 5, Stopping(), eos=False, garbage=True)
    assert plan.text != expected_text(PROMPT, 5)
    assert all(w in GARBAGE_VOCAB for w in plan.text.split())
    assert not set(GARBAGE_VOCAB) & set(VOCAB)


def test_eos_first_token_finishes_stop_with_one_empty_token() -> None:
    assert ends_at_once(f"{PROMPT} [sim:eos]") and not ends_at_once(PROMPT)
    plan = plan_output(kv_fingerprint(PROMPT), 8, Stopping(min_tokens=4), eos=True)
    assert (plan.deltas, plan.text, plan.n_tokens) == ([""], "", 1)
    assert plan.finish_reason == "stop" and not plan.length_capped


def _first_token_containing(stop: str, limit: int = 32) -> int:
    """The token count after which the correct answer first contains ``stop``."""
    return next(k for k in range(1, limit) if stop in expected_text(PROMPT, k))


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_before_the_cap_aborts(include_stop: bool) -> None:
    full = expected_text(PROMPT, 8)
    stop = full.split()[3]  # the 4th word (or an earlier word containing it)
    k = _first_token_containing(stop)
    assert k < 8
    plan = plan_output(
        kv_fingerprint(PROMPT), 8, Stopping(stops=(stop,), include_stop=include_stop), eos=False
    )
    cut = full.index(stop)
    assert plan.text == (full[: cut + len(stop)] if include_stop else full[:cut])
    assert plan.n_tokens == k
    assert (plan.finish_reason, plan.stop_reason) == ("stop", stop)
    assert not plan.length_capped  # request_finished answers kv_transfer_params null
    assert "".join(plan.deltas) == plan.text


def test_stop_string_on_the_last_allowed_token_stays_length_capped() -> None:
    """The scheduler length-caps before the detokenizer sees the stop string."""
    words = expected_text(PROMPT, 16).split()
    n = next(i + 1 for i, w in enumerate(words) if i >= 2 and _first_token_containing(w) == i + 1)
    plan = plan_output(kv_fingerprint(PROMPT), n, Stopping(stops=(words[n - 1],)), eos=False)
    assert plan.n_tokens == n
    assert plan.finish_reason == "stop" and plan.length_capped


def test_min_tokens_hides_stop_strings_in_the_first_tokens() -> None:
    first = expected_text(PROMPT, 1).split()[0]
    stopped = plan_output(kv_fingerprint(PROMPT), 4, Stopping(stops=(first,)), eos=False)
    assert stopped.n_tokens == 1 and stopped.text.strip() == ""
    assert first not in expected_text(PROMPT, 4)[len(expected_text(PROMPT, 1)) :]
    held = plan_output(kv_fingerprint(PROMPT), 4, Stopping(1, (first,)), eos=False)
    assert held.finish_reason == "length" and held.text == expected_text(PROMPT, 4)


def test_streaming_holds_back_a_possible_stop_string_prefix() -> None:
    """No delta may show the start of a stop string that is later cut off."""
    full = expected_text(PROMPT, 8)
    stop = full.split()[5] + " never"  # a prefix appears, the whole never does
    plan = plan_output(kv_fingerprint(PROMPT), 8, Stopping(stops=(stop,)), eos=False)
    assert plan.text == full and "".join(plan.deltas) == full
    hold = len(stop) - 1
    shown = ""
    for j, delta in enumerate(plan.deltas[:-1]):
        shown += delta
        assert len(shown) <= len(expected_text(PROMPT, j + 1)) - hold or shown == ""
