"""The ``/sim/faults`` and ``/sim/stats`` control routes, on the HTTP and the control port."""

from __future__ import annotations

import math

import aiohttp

from moriio_proxy.sim import SimFaults
from tests.harness.legs import prefill_body, prefill_params, sim


async def test_control_endpoints(http: aiohttp.ClientSession) -> None:
    async with sim("P", control_port=0) as p:
        assert p.control_url is not None
        for base in (p.url, p.control_url):
            async with http.get(base + "/sim/faults") as r:
                assert await r.json() == SimFaults().to_dict()
        ctl = p.control_url + "/sim/faults"
        async with http.post(
            ctl, json={"stall_first_byte": "inf", "die_after_tokens": 2, "probability": 0.25}
        ) as r:
            assert r.status == 200
            got = await r.json()
        assert got["stall_first_byte"] == "inf" and got["die_after_tokens"] == 2
        assert p.faults.stall_first_byte == math.inf and p.faults.probability == 0.25
        async with http.patch(ctl, json={"stall_after_tokens": [1, "inf"], "status": 502}) as r:
            got = await r.json()
        assert got["stall_after_tokens"] == [1, "inf"] and got["die_after_tokens"] == 2
        assert p.faults.stall_after_tokens == (1, math.inf)
        async with http.get(p.url + "/sim/faults") as r:
            assert await r.json() == got

        for bad in ({"bogus": 1}, {"status": 200}, {"stall_first_byte": -1}, [1]):
            async with http.post(ctl, json=bad) as r:
                assert r.status == 400, bad
                err = (await r.json())["error"]
                assert err["type"] == "BadRequestError" and err["code"] == 400
        async with http.post(ctl, json={"bogus": 1, "status": 503}) as r:
            assert "bogus" in (await r.json())["error"]["message"]
        assert p.faults.status == 502  # a rejected body changes nothing

        async with http.post(ctl, json={}) as r:  # POST replaces: {} clears every fault
            assert await r.json() == SimFaults().to_dict()
        async with http.post(
            p.url + "/v1/completions", json=prefill_body(prefill_params("tx-f"))
        ) as r:
            assert r.status == 200
        async with http.get(p.control_url + "/sim/stats") as r:
            stats = await r.json()
        assert stats["requests"] == 1 and stats["completed"] == 1
        assert stats["held_transfers"] == 1 and stats["pending_kv_waiters"] == 0
        assert stats["dead_reason"] is None and stats["faults_applied"] == {}
        assert stats["per_rank"] == {"0": 1} and stats["refusing"] is False
