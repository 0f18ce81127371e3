"""``moriio-proxy admin`` as a real process against a proxy serving in this process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.harness import eventually, running_proxy
from tests.harness.apps import serving

ROOT = Path(__file__).resolve().parents[2]


async def admin(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``moriio-proxy admin ARGS``: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moriio_proxy", "admin", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_drain_list_undrain_and_a_refusal_from_the_command_line():
    async with running_proxy(admin_allow_localhost=True) as proxy:  # no --admin-token
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        address = decode.http_address

        code, out, err = await admin(proxy.url, "drain", "d", address)
        assert (code, err) == (0, "")
        assert out == f"draining D instance {address}: no new requests; those in flight finish\n"
        entry = proxy.state.registry.get(("D", address))
        assert entry is not None and entry.draining

        code, out, _ = await admin(proxy.url, "list")
        assert code == 0
        rows = {line.split()[1]: line.split() for line in out.splitlines()}
        assert rows[address][:3] == ["D", address, "draining"]
        assert rows[proxy.sims[0].http_address][2] == "healthy"

        code, out, _ = await admin(proxy.url, "--json", "undrain", "D", address)
        assert code == 0 and json.loads(out)["instance"]["state"] == "healthy"
        assert not entry.draining

        code, out, err = await admin(proxy.url, "eject", "P", address)  # D's address as a P
        assert (code, out) == (1, "")
        assert err == (
            f"moriio-proxy admin: error: HTTP 404: no P instance {address} is registered\n"
        )


async def test_the_profile_fan_out_from_the_command_line_names_what_failed():
    async with running_proxy(admin_allow_localhost=True) as proxy:
        prefill = await proxy.add_sim("P", profiler=True)
        decode = await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        code, out, err = await admin(proxy.url, "start-profile")
        assert (code, out) == (1, "")
        assert err.startswith(
            "moriio-proxy admin: error: HTTP 502: failed on 1 instance(s): "
            f"D {decode.http_address}: HTTP 404"
        )
        assert err.count("\n") == 1
        assert prefill.stats.profiling


async def test_the_token_is_sent_as_a_bearer_header_from_the_flag_or_the_environment(
    dead_port: int,
):
    seen: list[str | None] = []

    async def listing(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"transfer_mode": None, "instances": []})

    app = web.Application()
    app.router.add_get("/admin/instances", listing)
    async with serving(app) as url:
        assert await admin(url, "--token", "s3cret", "list") == (
            0,
            "no instance registered (transfer mode unset)\n",
            "",
        )
        await admin(url, "list", env={"MORIIO_PROXY_ADMIN_TOKEN": "from-env"})
        await admin(url, "list", env={"MORIIO_PROXY_ADMIN_TOKEN": ""})
        assert seen == ["Bearer s3cret", "Bearer from-env", None]

    code, out, err = await admin(f"127.0.0.1:{dead_port}", "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"moriio-proxy admin: error: http://127.0.0.1:{dead_port}/admin/")
    assert err.count("\n") == 1


async def test_drain_wait_returns_once_the_instance_is_idle_or_says_it_is_still_busy():
    async with running_proxy(admin_allow_localhost=True) as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", token_latency=0.5)
        await proxy.wait_registered(1, 1)
        address = decode.http_address

        async def slow_request(max_tokens: int) -> int:
            body = {"model": "sim-model", "prompt": "slow", "max_tokens": max_tokens}
            async with (
                aiohttp.ClientSession() as session,
                session.post(proxy.url + "/v1/completions", json=body) as resp,
            ):
                await resp.read()
                return resp.status

        entry = proxy.state.registry.get(("D", address))
        assert entry is not None
        busy = asyncio.ensure_future(slow_request(200))  # busy until the test speeds it up
        await eventually(lambda: entry.total_inflight == 1, what="the request on the decode")
        code, out, err = await admin(proxy.url, "drain", "D", address, "--wait", "0.5")
        assert code == 1  # still busy: the drain holds, the command says so
        assert out == f"draining D instance {address}: no new requests; those in flight finish\n"
        assert err == (
            f"moriio-proxy admin: error: 1 request(s) still in flight on D instance {address} "
            "after 0.5s; it stays draining\n"
        )
        decode.config.token_latency = 0.001  # the simulator reads it token by token
        code, out, err = await admin(proxy.url, "drain", "D", address, "--wait", "120")
        assert (code, err) == (0, "")
        assert out.splitlines()[-1] == f"nothing in flight on D instance {address}"
        assert busy.done() and busy.result() == 200  # it finished before the command did
