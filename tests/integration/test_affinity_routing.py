"""Cache-aware and session routing through the proxy, over simulated prefill instances.

Each simulated engine records the legs it was sent, so "which prefill instance (and DP
rank) computed this prompt" is read from the engines themselves, not from the proxy.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import pytest

from moriio_proxy.sim import SimInstance, chat_prompt_text, expected_text
from tests.harness import RunningProxy, running_proxy

MODES = ["READ", "WRITE"]
SYSTEM = "You answer questions about the quarterly report in one short sentence. " * 3


async def cluster(proxy: RunningProxy, mode: str, n_prefill: int = 4) -> list[SimInstance]:
    prefills = [await proxy.add_sim("P", mode=mode) for _ in range(n_prefill)]
    await proxy.add_sim("D", mode=mode)
    await proxy.wait_registered(n_prefill, 1)
    return prefills


def prefill_places(prefills: list[SimInstance], key: str) -> dict[str, set[tuple[int, int]]]:
    """For each prompt (or rendered chat), the (instance, DP rank) pairs that prefilled it."""
    places: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for number, sim in enumerate(prefills):
        for leg in sim.legs:
            if leg.kind == "prefill" and leg.body is not None:
                value = leg.body[key]
                text = value if isinstance(value, str) else chat_prompt_text(value)
                places[text].add((number, leg.dp_rank or 0))
    return places


async def complete(client: aiohttp.ClientSession, proxy: RunningProxy, body: dict[str, Any]):
    async with client.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        payload = await resp.json()
    assert payload["choices"][0]["text"] == expected_text(body["prompt"], body["max_tokens"])


@pytest.mark.parametrize("mode", MODES)
async def test_cache_aware_sends_a_repeated_prompt_to_one_prefill(mode: str):
    async with running_proxy(prefill_policy="cache_aware") as proxy, aiohttp.ClientSession() as c:
        prefills = await cluster(proxy, mode)
        # No shared prefix, so new prompts spread by load (12 on one of 4: p = 4^-11).
        prompts = [f"Question {n}: what changed? {SYSTEM}" for n in range(12)]
        for _ in range(3):
            for prompt in prompts:
                await complete(c, proxy, {"model": "sim-model", "prompt": prompt, "max_tokens": 3})
        places = prefill_places(prefills, "prompt")
        assert set(places) == set(prompts)
        assert all(len(where) == 1 for where in places.values()), places
        assert len(set.union(*places.values())) > 1


async def test_cache_aware_keeps_a_conversation_on_one_prefill():
    async with running_proxy(prefill_policy="cache_aware") as proxy, aiohttp.ClientSession() as c:
        prefills = await cluster(proxy, "READ")
        conversations = {}
        for name in ("ann", "bo", "cy"):
            conversations[name] = [{"role": "system", "content": f"{SYSTEM} ({name})"}]
        for turn in range(3):
            for name, history in conversations.items():
                history.append({"role": "user", "content": f"{name} asks question {turn}"})
                body = {"model": "sim-model", "messages": history, "max_tokens": 4}
                async with c.post(proxy.url + "/v1/chat/completions", json=body) as resp:
                    answer = (await resp.json())["choices"][0]["message"]["content"]
                assert answer == expected_text(chat_prompt_text(history), 4)
                history.append({"role": "assistant", "content": answer})
        places = prefill_places(prefills, "messages")
        assert len(places) == 9
        for name in conversations:
            turns = [where for text, where in places.items() if f"({name})" in text]
            assert len(turns) == 3
            assert len(set.union(*turns)) == 1, (name, turns)


async def test_cache_aware_keeps_a_prompt_on_its_dp_rank():
    async with running_proxy(prefill_policy="cache_aware") as proxy, aiohttp.ClientSession() as c:
        prefill = await proxy.add_sim("P", mode="READ", dp_size=4)
        await proxy.add_sim("D", mode="READ")
        await proxy.wait_registered(1, 1)
        # Three prompts over four ranks: rotation alone would move each prompt around.
        prompts = [f"Item {n} of the list. {SYSTEM}" for n in range(3)]
        for _ in range(3):
            for prompt in prompts:
                await complete(c, proxy, {"model": "sim-model", "prompt": prompt, "max_tokens": 2})
        places = prefill_places([prefill], "prompt")
        assert all(len(where) == 1 for where in places.values()), places
        assert len(set.union(*places.values())) == 3  # new prompts took idle ranks


@pytest.mark.parametrize(
    ("settings", "headers", "field"),
    [
        ({}, lambda s: {"X-Session-ID": s}, None),
        ({"session_header": "X-Conversation"}, lambda s: {"X-Conversation": s}, None),
        ({}, lambda s: {}, "user"),
    ],
    ids=["default-header", "configured-header", "user-field"],
)
async def test_session_affinity_pins_a_session_to_one_prefill(settings, headers, field):
    async with (
        running_proxy(prefill_policy="session", **settings) as proxy,
        aiohttp.ClientSession() as c,
    ):
        prefills = await cluster(proxy, "READ")
        sessions = [f"session-{n}" for n in range(6)]
        for turn in range(3):
            for session in sessions:
                body = {"model": "sim-model", "prompt": f"{session} turn {turn}", "max_tokens": 2}
                if field:
                    body[field] = session
                async with c.post(
                    proxy.url + "/v1/completions", json=body, headers=headers(session)
                ) as resp:
                    assert resp.status == 200
        places = prefill_places(prefills, "prompt")
        for session in sessions:
            where = [w for text, w in places.items() if text.startswith(f"{session} ")]
            assert len(where) == 3 and len(set.union(*where)) == 1, (session, where)
