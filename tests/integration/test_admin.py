"""The admin API against a proxy in this process with simulated instances: drain, undrain,
eject, remove and add at run time, with traffic running, and no request lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from moriio_proxy.sim import SimInstance, expected_text
from tests.harness import RunningProxy, eventually, running_proxy
from tests.harness.clock import JumpingClock
from tests.harness.proxy import start_sim

MAX_TOKENS = 8

# These tests exercise the actions, not the admin door (tests/integration/test_security.py):
# the proxy lets its loopback clients in, as --admin-allow-localhost does.
LOOPBACK = {"admin_allow_localhost": True}


def decodes(sim: SimInstance) -> int:
    """Decode legs the simulated instance has seen."""
    return sum(1 for leg in sim.legs if leg.kind == "decode")


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        text = ""
        async for line in resp.content:
            if line.startswith(b"data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
        return text


async def admin(
    http: aiohttp.ClientSession, url: str, action: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/admin/instances/{action}", json=body) as resp:
        return resp.status, await resp.json()


class Traffic:
    """Clients sending streamed completions one after another while the block runs; every
    answer is checked, so a request lost or garbled fails the test when the block ends."""

    def __init__(self, http: aiohttp.ClientSession, url: str, clients: int = 4) -> None:
        self.clients = clients
        self.done = 0
        self.failures: list[str] = []
        self._http = http
        self._url = url
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.ensure_future(self._client(n)) for n in range(self.clients)]
        return self

    async def __aexit__(self, kind: object, *_: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if kind is None:
            assert self.failures == []

    async def _client(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            prompt = f"client {n} request {i}"
            try:
                text = await complete(self._http, self._url, prompt)
                if text != expected_text(prompt, MAX_TOKENS):
                    self.failures.append(f"{prompt}: {text!r}")
            except (AssertionError, aiohttp.ClientError) as exc:
                self.failures.append(f"{prompt}: {exc}")
            self.done += 1
            i += 1

    async def more(self, n: int) -> None:
        """Until ``n`` more requests have finished. The requests being alike, twice
        ``clients`` of them outlast every request that was running when this began."""
        target = self.done + n
        await eventually(lambda: self.done >= target, what=f"{n} more requests")


@contextlib.asynccontextmanager
async def two_decodes(
    **overrides: Any,
) -> AsyncIterator[tuple[RunningProxy, SimInstance, SimInstance]]:
    """A proxy with one prefill and two decodes that take a while per token."""
    overrides.setdefault("decode_policy", "round_robin")
    overrides.setdefault("admin_allow_localhost", True)  # see LOOPBACK
    async with running_proxy(**overrides) as proxy:
        await proxy.add_sim("P")
        d1 = await proxy.add_sim("D", token_latency=0.05)
        d2 = await proxy.add_sim("D", token_latency=0.05)
        await proxy.wait_registered(1, 2)
        yield proxy, d1, d2


def inflight(proxy: RunningProxy, sim: SimInstance) -> int:
    entry = proxy.state.registry.get(("D", sim.http_address))
    return entry.total_inflight if entry is not None else 0


async def test_drain_with_traffic_running_loses_no_request(http: aiohttp.ClientSession):
    async with two_decodes() as (proxy, d1, d2), Traffic(http, proxy.url) as traffic:
        await eventually(lambda: inflight(proxy, d1) > 0, what="requests in flight on D1")
        status, answer = await admin(
            http, proxy.url, "drain", role="D", http_address=d1.http_address
        )
        assert status == 200
        assert answer["message"] == (
            f"draining D instance {d1.http_address}: no new requests; those in flight finish"
        )
        assert answer["instance"]["state"] == "draining"
        assert answer["instance"]["inflight"] > 0  # still running, and they will finish
        await traffic.more(2 * traffic.clients)  # those paired with D1 before the drain too
        await eventually(lambda: inflight(proxy, d1) == 0, what="D1's requests finished")
        before = decodes(d1), decodes(d2)
        await traffic.more(12)
        # Of the 12, those that were running when it began had their decode leg already.
        assert decodes(d1) == before[0] and decodes(d2) >= before[1] + 12 - traffic.clients
        async with http.get(proxy.url + "/admin/instances") as resp:
            states = {i["http_address"]: i["state"] for i in (await resp.json())["instances"]}
        assert states[d1.http_address] == "draining" and states[d2.http_address] == "healthy"

        status, answer = await admin(
            http, proxy.url, "undrain", role="D", http_address=d1.http_address
        )
        assert (status, answer["instance"]["state"]) == (200, "healthy")
        await eventually(lambda: decodes(d1) > before[0], what="D1 serving again")


async def test_remove_with_traffic_running_loses_no_request(http: aiohttp.ClientSession):
    async with two_decodes() as (proxy, d1, _), Traffic(http, proxy.url) as traffic:
        await eventually(lambda: inflight(proxy, d1) > 0, what="requests in flight on D1")
        d1.heartbeating = False  # so that it stays forgotten until the test says
        status, answer = await admin(
            http, proxy.url, "remove", role="D", http_address=d1.http_address
        )
        assert (status, answer["instance"]) == (200, None)
        assert answer["message"].endswith("if it still sends heartbeats, it registers again")
        assert proxy.state.registry.get(("D", d1.http_address)) is None
        await traffic.more(2 * traffic.clients)  # those paired with D1 before it went
        served = decodes(d1)
        await traffic.more(12)
        assert decodes(d1) == served

        d1.heartbeating = True  # a live instance comes back by itself
        await eventually(lambda: proxy.state.registry.get(("D", d1.http_address)) is not None)
        await eventually(lambda: decodes(d1) > served, what="D1 serving again")


async def test_eject_for_some_seconds(http: aiohttp.ClientSession):
    clock = JumpingClock()
    async with two_decodes(clock=clock, instance_ttl=600.0) as (proxy, d1, d2):
        status, answer = await admin(
            http, proxy.url, "eject", role="D", http_address=d1.http_address, seconds=300
        )
        assert (status, answer["instance"]["state"]) == (200, "ejected")
        assert answer["message"] == f"ejected D instance {d1.http_address} for 300s"
        for i in range(4):
            await complete(http, proxy.url, f"while ejected {i}")
        assert decodes(d1) == 0 and decodes(d2) == 4
        clock.advance(280.0)  # real time passes too: a margin a slow machine keeps
        await complete(http, proxy.url, "still ejected")
        assert decodes(d1) == 0
        clock.advance(20.0)
        for i in range(4):
            await complete(http, proxy.url, f"back {i}")
        assert decodes(d1) == 2 and decodes(d2) == 7  # round robin over both again


async def test_add_a_static_instance_at_run_time_and_serve_through_it(
    http: aiohttp.ClientSession,
):
    async with running_proxy(**LOOPBACK) as proxy:
        await proxy.add_sim("P")
        await proxy.wait_registered(1, 0)
        decode = await start_sim("D", None)  # sends no heartbeat: only the API can add it
        try:
            status, answer = await admin(http, proxy.url, "add", **decode.registration())
            assert status == 201
            assert answer["message"] == f"added D instance {decode.http_address} (READ)"
            view = answer["instance"]
            assert (view["static"], view["state"], view["zmq_address"]) == (
                True,
                "healthy",
                decode.zmq_address,
            )
            assert await complete(http, proxy.url, "through a static decode") == expected_text(
                "through a static decode", MAX_TOKENS
            )
            assert decodes(decode) == 1
            status, answer = await admin(http, proxy.url, "add", **decode.registration())
            assert (status, answer["message"]) == (
                200,
                f"now static: D instance {decode.http_address} (READ)",
            )
            wrong = {
                **decode.registration(),
                "http_address": "127.0.0.1:1",
                "transfer_mode": "WRITE",
            }
            status, answer = await admin(http, proxy.url, "add", **wrong)
            assert status == 409
            assert answer["error"]["message"] == (
                "D instance 127.0.0.1:1 uses transfer mode WRITE, but READ is in force"
            )
            status, _ = await admin(
                http, proxy.url, "remove", role="D", http_address=decode.http_address
            )
            assert status == 200 and proxy.state.registry.get(("D", decode.http_address)) is None
        finally:
            await decode.stop()


async def test_bad_admin_requests_are_clear_4xx_in_vllms_shape(http: aiohttp.ClientSession):
    async with running_proxy(**LOOPBACK) as proxy:
        await proxy.add_sim("D")
        await proxy.wait_registered(0, 1)
        address = proxy.sims[0].http_address

        async def refused(path: str, data: bytes, method: str = "POST") -> tuple[int, dict]:
            async with http.request(method, proxy.url + path, data=data) as resp:
                return resp.status, (await resp.json())["error"]

        status, error = await refused("/admin/instances/drain", b"{not json")
        assert status == 400 and error["message"].startswith("the body is not valid JSON")
        assert error["type"] == "BadRequestError" and error["code"] == 400
        status, error = await refused("/admin/instances/reboot", b"{}")
        assert (status, error["type"]) == (404, "NotFoundError")
        assert error["message"] == (
            "unknown action 'reboot'; one of: drain, undrain, eject, remove, add"
        )
        body = b'{"role": "P", "http_address": "%s"}' % address.encode()
        status, error = await refused("/admin/instances/drain", body)
        assert (status, error["message"]) == (404, f"no P instance {address} is registered")
        status, error = await refused("/admin/instances/drain", b"", method="GET")
        assert status == 405 and error["code"] == 405


async def test_ready_says_so_when_every_decode_drains(http: aiohttp.ClientSession):
    async with running_proxy(**LOOPBACK) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        await admin(http, proxy.url, "drain", role="D", http_address=decode.http_address)
        async with http.get(proxy.url + "/ready") as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "every decode instance is draining"
        body = {"model": "sim-model", "prompt": "x", "max_tokens": 2}
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
        await admin(http, proxy.url, "undrain", role="D", http_address=decode.http_address)
        async with http.get(proxy.url + "/ready") as resp:
            assert resp.status == 200
