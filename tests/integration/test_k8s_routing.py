"""Two proxy replicas with Kubernetes discovery route to the same simulated pods.

With several replicas behind one Service a vLLM heartbeat reaches only one of them;
watching the pods is what lets every replica see every instance.
"""

from __future__ import annotations

import aiohttp
import pytest

pytest.importorskip("kubernetes_asyncio", reason="needs the k8s extra (kubernetes-asyncio)")

from moriio_proxy.sim import SimConfig, SimInstance, expected_text
from tests.harness import running_proxy
from tests.harness.kube import FakeKubeAPI, make_pod


def pod_for(name: str, role: str, sim: SimInstance) -> dict:
    return make_pod(
        name,
        role,
        "127.0.0.1",
        http=sim.port,
        handshake=sim.handshake_base,
        notify=sim.notify_base,
        mode=sim.config.mode,
    )


async def test_every_replica_routes_to_every_pod_and_follows_deletions():
    api = FakeKubeAPI()
    sims = [SimInstance(SimConfig(role=r, proxy=None)) for r in "PD"]
    for sim in sims:
        await sim.start()
    for name, role, sim in (("p-0", "prefill", sims[0]), ("d-0", "decode", sims[1])):
        await api.put(pod_for(name, role, sim))
    await api.start()
    settings = {"discovery": "kubernetes", "k8s_namespace": "moriio", "k8s_api_url": api.url}
    try:
        async with (
            running_proxy(**settings) as first,
            running_proxy(**settings) as second,
            aiohttp.ClientSession() as client,
        ):
            for replica in (first, second):
                await replica.wait_registered(1, 1)
                body = {"model": "sim-model", "prompt": "hello pods", "max_tokens": 3}
                async with client.post(replica.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    payload = await resp.json()
                assert payload["choices"][0]["text"] == expected_text("hello pods", 3)
            await api.delete("d-0")
            for replica in (first, second):
                await replica.wait_registered(1, 0)
                async with client.post(replica.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 503
                async with client.get(replica.url + "/ready") as resp:
                    assert resp.status == 503
    finally:
        for sim in sims:
            await sim.stop()
        await api.close()
