"""The shared-prefix workload: a few long system prompts, many multi-turn conversations.

Each conversation opens with one of the system prompts and a first question; every later
turn sends the whole history (the previous turns' questions and answers) plus a new
question, so each request's prompt starts with the previous one's, as a chat client's do.
Prefix caching pays off twice here: across conversations on the shared system prompt, and
within a conversation on its history, the larger share once a conversation is a few turns
long.

Everything is drawn from one seeded RNG, so every router in a run (and every run with the
same seed) is given the same conversations in the same order. Words are synthetic
(``w1234``): the simulator's tokenizer splits on whitespace, so a word is a token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of the workload; every length is in words (the simulator's tokens)."""

    conversations: int = 150
    system_prompts: int = 8
    system_words: tuple[int, int] = (400, 700)  # inclusive range per system prompt
    turns: tuple[int, int] = (6, 14)  # questions per conversation
    question_words: tuple[int, int] = (60, 250)
    answer_tokens: int = 64  # max_tokens of every turn (the answer is appended to history)
    # A conversation ends before a prompt would leave less than an answer's room in the
    # simulator's context (max_model_len 4096), as a client would have to cut it then.
    max_prompt_tokens: int = 4096 - 64
    vocabulary: int = 20_000
    seed: int = 1


@dataclass(frozen=True)
class Conversation:
    """One conversation: its session id, system prompt and the questions of its turns."""

    session: str
    system: str
    questions: tuple[str, ...]

    def messages(self, answers: list[str], turn: int) -> list[dict[str, str]]:
        """The chat messages of turn ``turn`` (0-based), given the answers so far."""
        out = [{"role": "system", "content": self.system}]
        for i in range(turn):
            out.append({"role": "user", "content": self.questions[i]})
            out.append({"role": "assistant", "content": answers[i]})
        out.append({"role": "user", "content": self.questions[turn]})
        return out


def _text(rng: random.Random, bounds: tuple[int, int], vocabulary: int) -> str:
    n = rng.randint(*bounds)
    return " ".join(f"w{rng.randrange(vocabulary)}" for _ in range(n))


def build(spec: WorkloadSpec) -> list[Conversation]:
    """The conversations, in the order the clients take them."""
    rng = random.Random(spec.seed)
    systems = [
        f"You are assistant {i}. " + _text(rng, spec.system_words, spec.vocabulary)
        for i in range(spec.system_prompts)
    ]
    out = []
    for c in range(spec.conversations):
        turns = rng.randint(*spec.turns)
        questions = [_text(rng, spec.question_words, spec.vocabulary) for _ in range(turns)]
        system = rng.choice(systems)
        # Tokens as the simulator counts them: its chat template is "<role>: <content>\n".
        history = 1 + len(system.split())
        for t, question in enumerate(questions):
            if history + 1 + len(question.split()) > spec.max_prompt_tokens:
                del questions[t:]
                break
            history += 1 + len(question.split()) + 1 + spec.answer_tokens
        out.append(Conversation(f"conv-{spec.seed}-{c}", system, tuple(questions)))
    return out


def total_requests(conversations: list[Conversation]) -> int:
    return sum(len(c.questions) for c in conversations)
