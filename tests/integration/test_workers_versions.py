"""``serve --workers N`` and vLLM versions: the supervisor learns them, every worker pairs
with them. A mixed-TP WRITE fleet is served only when the workers know both sides run
vLLM 0.33 (unknown counts as 0.32), so correct answers prove the snapshots carried them."""

from __future__ import annotations

import asyncio

from moriio_proxy.sim import SimConfig, SimInstance, expected_text
from tests.integration.test_workers import complete, fleet, get_json, wait_ready


async def test_workers_pair_with_the_versions_the_supervisor_learned() -> None:
    async with fleet(2) as running:
        for role, tp in (("P", 2), ("D", 4)):
            sim = SimInstance(
                SimConfig(role=role, mode="WRITE", tp_size=tp, proxy=running.discovery,
                          heartbeat_interval=0.2)
            )  # fmt: skip
            await sim.start()
            running.sims.append(sim)
        await wait_ready(running)
        streak = 0
        for _ in range(200):  # fresh connections: whichever worker answers knows them
            _, view = await get_json(running.url + "/admin/instances")
            known = {i["vllm_version"] for i in view["instances"]} == {"0.33.0"}
            streak = streak + 1 if known else 0
            if streak == 8:
                break
            await asyncio.sleep(0.05)
        assert streak == 8, view
        assert all(i["unpaired"] is None for i in view["instances"])
        prompts = [f"mixed tp prompt {i}" for i in range(8)]
        texts = await asyncio.gather(*(complete(running.url, p) for p in prompts))
        assert texts == [expected_text(p, 6) for p in prompts]
