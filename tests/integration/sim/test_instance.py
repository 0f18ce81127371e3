"""SimInstance's lifecycle and ``run_sim`` (the ``moriio-proxy sim`` main loop)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from moriio_proxy.sim import SimConfig, SimInstance, kv_fingerprint, run_sim
from moriio_proxy.testing import parse_sim_started
from tests.harness.legs import PROMPT
from tests.harness.waiting import STATE_TIMEOUT, eventually


async def test_stop_is_idempotent_and_fingerprint_stable() -> None:
    inst = SimInstance(SimConfig(role="P"))
    await inst.stop()  # never started
    inst = SimInstance(SimConfig(role="P"))
    await inst.start()
    await inst.stop()
    await inst.stop()
    assert kv_fingerprint("a  b") == kv_fingerprint("a b")


async def test_run_sim_returns_1_when_the_engine_dies(
    http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    task = asyncio.ensure_future(run_sim(SimConfig(role="D", mode="WRITE")))
    printed: list[str] = []

    def started() -> bool:
        printed.append(capsys.readouterr().out)
        return parse_sim_started("".join(printed)) is not None

    await eventually(started, what="the simulator's announcement")
    announced = parse_sim_started("".join(printed))
    assert announced is not None
    assert (announced.role, announced.mode, announced.vllm_version) == ("D", "WRITE", "0.33")
    url = announced.url
    async with http.post(
        url + "/v1/completions",
        json={"prompt": PROMPT, "kv_transfer_params": {"do_remote_prefill": True}},
    ) as r:
        assert r.status == 500
    assert await asyncio.wait_for(task, STATE_TIMEOUT) == 1
