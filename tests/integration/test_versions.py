"""The proxy in front of vLLM 0.32 and 0.33 (simulated), and of fleets mixing them: it
learns each instance's version, pairs only what the engines can serve, says why an
instance is unused, retries a failed KV load on a fresh pair, and never lets
kv_transfer_params reach a client."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from moriio_proxy.check import run_check
from moriio_proxy.sim import EOS_MARKER, SimInstance, chat_prompt_text, expected_text
from tests.harness import RunningProxy, read_sse, running_proxy

VERSIONS = ["0.32", "0.33"]
PROMPT = "versions under test"


def body(endpoint: str, stream: bool, prompt: str = PROMPT, max_tokens: int = 4) -> dict:
    made: dict[str, Any] = {"model": "sim-model", "max_tokens": max_tokens, "stream": stream}
    if endpoint == "chat":
        made["messages"] = [{"role": "user", "content": prompt}]
    else:
        made["prompt"] = prompt
    return made


def path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


async def ask(
    proxy: RunningProxy, endpoint: str = "completions", stream: bool = False, **kw: Any
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + path(endpoint), json=body(endpoint, stream, **kw)) as r,
    ):
        return r.status, await r.read()


def answer_text(endpoint: str, stream: bool, raw: bytes) -> str:
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return str(choice["message"]["content"] if endpoint == "chat" else choice["text"])
    text = ""
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or []:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def admin(proxy: RunningProxy) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/instances") as r:
        return {i["http_address"]: i for i in (await r.json())["instances"]}


def metric(proxy: RunningProxy, name: str, labels: dict[str, str] | None = None) -> float:
    value = proxy.state.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


# ------------------------------------------------------------------ learning versions


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_proxy_learns_each_version_and_again_after_an_eviction(version: str) -> None:
    async with running_proxy(instance_ttl=0.6) as proxy:
        prefill = await proxy.add_sim("P", vllm_version=version)
        await proxy.add_sim("D", vllm_version=version)
        await proxy.wait_registered(1, 1)
        views = await admin(proxy)
        assert {v["vllm_version"] for v in views.values()} == {f"{version}.0"}
        assert all(v["unpaired"] is None for v in views.values())
        # The prefill goes quiet, is evicted, and comes back running the other release.
        prefill.heartbeating = False
        await proxy.wait_for(lambda: len(proxy.state.registry.entries()) == 1)  # evicted
        other = "0.33" if version == "0.32" else "0.32"
        prefill.config.vllm_version = other
        prefill.heartbeating = True
        await proxy.wait_registered(1, 1)
        views = await admin(proxy)
        assert views[prefill.http_address]["vllm_version"] == f"{other}.0"


# ------------------------------------------------------------------------ pairing


async def test_a_033_prefill_is_never_paired_with_a_032_decode_in_write_mode() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode="WRITE", vllm_version="0.33")
        old = await proxy.add_sim("D", mode="WRITE", vllm_version="0.32")
        await proxy.wait_registered(1, 1)
        status, raw = await ask(proxy)
        assert status == 503
        assert b"no prefill and decode instance can work together" in raw
        assert b"write_failed" in raw
        assert old.stats.requests == 0
        views = await admin(proxy)
        assert all(v["unpaired"] for v in views.values())
        assert "a vLLM 0.33 prefill must not write" in views[old.http_address]["unpaired"]
        report = await run_check(proxy.url, timeout=5)
        assert report.by_name("pairing").status == "FAIL"
        assert report.exit_code == 1

        # A 0.33 decode joins: everything goes there, the 0.32 one stays unused.
        new = await proxy.add_sim("D", mode="WRITE", vllm_version="0.33")
        await proxy.wait_registered(1, 2)
        for i in range(4):
            status, raw = await ask(proxy, prompt=f"{PROMPT} {i}")
            assert status == 200, raw
            assert answer_text("completions", False, raw) == expected_text(f"{PROMPT} {i}", 4)
        assert new.stats.completed == 4 and old.stats.requests == 0
        views = await admin(proxy)
        assert views[new.http_address]["unpaired"] is None
        assert views[old.http_address]["unpaired"] is not None
        report = await run_check(proxy.url, timeout=5)
        pairing = report.by_name("pairing")
        assert pairing.status == "WARN" and old.http_address in pairing.message


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
@pytest.mark.parametrize(("p_version", "d_version"), [("0.32", "0.33"), ("0.33", "0.32")])
async def test_mixed_fleets_of_equal_tp_are_served_where_the_engines_allow(
    mode: str, p_version: str, d_version: str
) -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode, vllm_version=p_version, tp_size=2)
        await proxy.add_sim("D", mode=mode, vllm_version=d_version, tp_size=2)
        await proxy.wait_registered(1, 1)
        refused = mode == "WRITE" and p_version == "0.33"  # write_failed kills a 0.32 D
        for endpoint in ("completions", "chat"):
            for stream in (False, True):
                status, raw = await ask(proxy, endpoint, stream)
                if refused:
                    assert status == 503, raw
                    continue
                assert status == 200, raw
                assert answer_text(endpoint, stream, raw) == expected_text_for(endpoint)
        for sim in proxy.sims:
            assert sim.dead_reason is None and sim.stats.garbage_outputs == 0


def expected_text_for(endpoint: str) -> str:
    if endpoint == "completions":
        return expected_text(PROMPT, 4)
    return expected_text(chat_prompt_text([{"role": "user", "content": PROMPT}]), 4)


async def test_mixed_tp_is_served_in_write_mode_when_both_run_033() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode="WRITE", tp_size=2)
        decode = await proxy.add_sim("D", mode="WRITE", tp_size=4)
        await proxy.wait_registered(1, 1)
        for endpoint in ("completions", "chat"):
            for stream in (False, True):
                status, raw = await ask(proxy, endpoint, stream)
                assert status == 200, raw
                assert answer_text(endpoint, stream, raw) == expected_text_for(endpoint)
        assert decode.stats.kv_received == 4
        # The legs named each side's real TP size (the simulated 0.33 checks both).
        leg = decode.legs[-1].body
        assert leg is not None and leg["kv_transfer_params"]["remote_tp_size"] == 2


@pytest.mark.parametrize(
    ("mode", "p_version", "d_version", "why"),
    [
        ("WRITE", "0.32", "0.33", "only when both run vLLM 0.33"),
        ("WRITE", "0.32", "0.32", "only when both run vLLM 0.33"),
        ("WRITE", "0.33", "0.32", "must not write to a decode not known to run 0.33"),
        ("READ", "0.32", "0.32", "READ mode pairs only equal TP sizes"),
        ("READ", "0.33", "0.33", "READ mode pairs only equal TP sizes"),
    ],
)
async def test_mixed_tp_is_never_paired_otherwise(
    mode: str, p_version: str, d_version: str, why: str
) -> None:
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P", mode=mode, vllm_version=p_version, tp_size=2)
        decode = await proxy.add_sim("D", mode=mode, vllm_version=d_version, tp_size=4)
        await proxy.wait_registered(1, 1)
        status, raw = await ask(proxy)
        assert status == 503 and why.encode() in raw
        assert prefill.stats.requests == decode.stats.requests == 0
        views = await admin(proxy)
        assert why in views[decode.http_address]["unpaired"]
        assert why in views[prefill.http_address]["unpaired"]


# ---------------------------------------------------------------- failed KV loads


async def kv_load_fleet(proxy: RunningProxy, version: str, stall: float) -> SimInstance:
    """WRITE: a prefill that gives up waiting for a decode's blocks after 1 s, a decode
    that holds every request for ``stall`` seconds first (a long queue), and a good one."""
    await proxy.add_sim("P", mode="WRITE", vllm_version=version, defer_timeout=1.0)
    slow = await proxy.add_sim("D", mode="WRITE", vllm_version=version)
    await slow.set_faults(stall_first_byte=stall)
    await proxy.wait_registered(1, 1)  # registered first: round robin's first choice
    await proxy.add_sim("D", mode="WRITE", vllm_version=version)
    await proxy.wait_registered(1, 2)
    return slow


@pytest.mark.parametrize(("endpoint", "stream"), [
    ("completions", False), ("completions", True), ("chat", False), ("chat", True),
])  # fmt: skip
async def test_a_033_kv_load_failure_is_retried_on_a_fresh_pair(
    endpoint: str, stream: bool
) -> None:
    async with running_proxy(decode_policy="round_robin", eject_after=1) as proxy:
        slow = await kv_load_fleet(proxy, "0.33", stall=2.5)
        status, raw = await ask(proxy, endpoint, stream)  # round robin: the slow one first
        assert status == 200, raw
        assert answer_text(endpoint, stream, raw) == expected_text_for(endpoint)
        assert b"error" not in raw and b"kv_transfer_params" not in raw
        assert slow.stats.kv_load_failures == 1
        before = {"when": "before_first_byte"}
        assert metric(proxy, "moriio_proxy_kv_load_failures_total", before) == 1
        assert metric(proxy, "moriio_proxy_retries_total") == 1
        kind = {"leg": "decode", "kind": "kv_load"}
        assert metric(proxy, "moriio_proxy_upstream_errors_total", kind) == 1
        # The decode reported the failure but did not cause it: no step toward ejection.
        entry = proxy.state.registry.get(("D", slow.http_address))
        assert entry is not None and entry.failures == 0
        assert not proxy.state.registry.is_ejected(entry)


async def test_a_032_decode_in_the_same_place_waits_until_the_first_byte_timeout() -> None:
    """0.32 has no write_failed: the proxy only gets out by its own timeout, then retries."""
    async with running_proxy(
        decode_policy="round_robin", eject_after=0, decode_first_byte_timeout=2.0
    ) as proxy:
        slow = await kv_load_fleet(proxy, "0.32", stall=30.0)
        started = time.monotonic()
        status, raw = await ask(proxy)
        assert status == 200 and answer_text("completions", False, raw) == expected_text_for(
            "completions"
        )
        assert time.monotonic() - started >= 2.0
        assert slow.stats.kv_load_failures == 0
        assert (
            metric(proxy, "moriio_proxy_kv_load_failures_total", {"when": "before_first_byte"}) == 0
        )
        kind = {"leg": "decode", "kind": "timeout"}
        assert metric(proxy, "moriio_proxy_upstream_errors_total", kind) == 1


@pytest.mark.parametrize(("endpoint", "stream"), [("completions", False), ("chat", True)])
async def test_a_kv_load_failure_without_a_fresh_pair_is_one_clear_error(
    endpoint: str, stream: bool
) -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode="WRITE", defer_timeout=1.0)
        decode = await proxy.add_sim("D", mode="WRITE")
        await proxy.wait_registered(1, 1)
        await decode.set_faults(stall_first_byte=2.5)
        status, raw = await ask(proxy, endpoint, stream)
        assert status == 502  # nothing had reached the client: a status, not a stream
        assert b"the decode instance failed: the KV cache never arrived" in raw
        await decode.set_faults(stall_first_byte=None)
        status, raw = await ask(proxy, endpoint, stream)
        assert status == 200 and answer_text(endpoint, stream, raw) == expected_text_for(endpoint)


# ------------------------------------------------------ nothing internal reaches a client


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_no_answer_carries_kv_transfer_params(version: str, mode: str) -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode, vllm_version=version)
        await proxy.add_sim("D", mode=mode, vllm_version=version)
        await proxy.wait_registered(1, 1)
        for endpoint in ("completions", "chat"):
            for stream in (False, True):
                for prompt in (PROMPT, f"{PROMPT} {EOS_MARKER}"):  # decode's, and P's own
                    status, raw = await ask(proxy, endpoint, stream, prompt=prompt)
                    assert status == 200, raw
                    assert b"kv_transfer_params" not in raw
                    assert b"___prefill_addr_" not in raw
        assert metric(proxy, "moriio_proxy_prefill_complete_answers_total") == 4


async def test_the_stream_the_client_gets_is_what_decode_sent_minus_the_key() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode="WRITE")
        await proxy.add_sim("D", mode="WRITE")
        await proxy.wait_registered(1, 1)
        request = body("chat", True) | {"stream_options": {"include_usage": True}}
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + path("chat"), json=request) as r,
        ):
            events = await read_sse(r)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = events[1:-2]
        assert len(contents) == 4
        assert all(list(e) == ["id", "object", "created", "model", "choices"] for e in contents)
        assert events[-2]["usage"]["completion_tokens"] == 4 and events[-1] == "[DONE]"
