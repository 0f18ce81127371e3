"""The HTTP side's controls over real sockets, each in its allowed and its refused case:
client API keys, the admin door, what the instances are sent, and the per-client limits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from moriio_proxy.check import run_check
from moriio_proxy.config import load_config
from moriio_proxy.sim import expected_text
from moriio_proxy.state import build_upstream
from tests.harness import RunningProxy, running_proxy
from tests.harness.apps import serving
from tests.harness.certs import make_ca

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox jumps over the lazy dog"
BODY = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 5}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def pair(running: RunningProxy, **sim: Any) -> RunningProxy:
    await running.add_sim("P", **sim)
    await running.add_sim("D", **sim)
    await running.wait_registered(1, 1)
    return running


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, **kwargs) as resp:
        payload = await resp.json(content_type=None) if resp.content_length != 0 else None
        return resp.status, payload, resp.headers


ERROR_TYPES = {
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLarge",
}


def assert_openai_error(payload: Any, status: int) -> None:
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == status
    assert payload["error"]["type"] == ERROR_TYPES[status]


# --------------------------------------------------------------------- client keys


async def test_generation_needs_one_of_the_keys(http: aiohttp.ClientSession, tmp_path: Path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team c\nsk-from-file  # trailing comment\n\n", encoding="utf-8")
    async with running_proxy(api_key=["sk-one", "sk-two"], api_key_file=str(keys_file)) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        status, payload, headers = await status_of(http, "POST", url, json=BODY)
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert_openai_error(payload, 401)
        assert "missing" in payload["error"]["message"]
        status, payload, _ = await status_of(http, "POST", url, json=BODY, headers=auth("sk-nope"))
        assert status == 401
        assert payload["error"]["message"] == "invalid API key"
        # a key's prefix, or the key without its scheme, is not the key
        for header in ("Bearer sk-on", "sk-one", "Basic sk-one", "Bearer sk-one2"):
            status, _, _ = await status_of(
                http, "POST", url, json=BODY, headers={"Authorization": header}
            )
            assert status == 401, header
        for key in ("sk-one", "sk-two", "sk-from-file"):
            status, payload, _ = await status_of(http, "POST", url, json=BODY, headers=auth(key))
            assert status == 200, payload
            assert payload["choices"][0]["text"] == expected_text(PROMPT, 5)
        # the client's key stays with the proxy: vLLM is sent none unless configured
        assert all("Authorization" not in leg.headers for s in p.sims for leg in s.legs)


async def test_models_need_a_key_health_never_ready_and_metrics_when_asked(
    http: aiohttp.ClientSession,
):
    async with running_proxy(api_key=["sk-one"]) as p:
        await pair(p)
        assert (await status_of(http, "GET", p.url + "/v1/models"))[0] == 401
        status, payload, _ = await status_of(
            http, "GET", p.url + "/v1/models", headers=auth("sk-one")
        )
        assert status == 200 and payload["data"][0]["id"] == "sim-model"
        # an unknown /v1 path is not a way to learn what exists without a key
        assert (await status_of(http, "GET", p.url + "/v1/nothing"))[0] == 401
        for path in ("/health", "/ready", "/metrics"):
            async with http.get(p.url + path) as resp:
                assert resp.status == 200, path
    async with running_proxy(
        api_key=["sk-one"], ready_requires_key=True, metrics_requires_key=True
    ) as p:
        await pair(p)
        async with http.get(p.url + "/health") as resp:
            assert resp.status == 200
        for path in ("/ready", "/metrics"):
            async with http.get(p.url + path) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with http.get(p.url + path, headers=auth("sk-one")) as resp:
                assert resp.status == 200, path


async def test_without_keys_the_proxy_is_open_as_before(http: aiohttp.ClientSession):
    async with running_proxy() as p:
        await pair(p)
        status, _, _ = await status_of(http, "POST", p.url + "/v1/completions", json=BODY)
        assert status == 200
        assert (await status_of(http, "GET", p.url + "/v1/models"))[0] == 200


# ----------------------------------------------------------------------- admin door


async def test_without_a_token_admin_reads_stay_open_and_changes_are_refused(
    http: aiohttp.ClientSession,
):
    async with running_proxy() as p:
        assert (await status_of(http, "GET", p.url + "/admin/instances"))[0] == 200
        # a route nobody has written yet is refused by the guard, not by routing
        for method, path in (
            ("POST", "/admin/anything"),
            ("DELETE", "/admin/instances/P/x"),
            ("POST", "/start_profile"),
            ("POST", "/stop_profile"),
        ):
            status, payload, _ = await status_of(http, method, p.url + path)
            assert status == 403, (method, path)
            assert_openai_error(payload, 403)
            assert "--admin-token" in payload["error"]["message"]
            assert "--admin-allow-localhost" in payload["error"]["message"]


async def test_loopback_may_change_state_when_the_operator_allows_it(
    http: aiohttp.ClientSession,
):
    async with running_proxy(admin_allow_localhost=True) as p:
        # past the guard: what answers is routing (no such route yet), not 403
        status, _, _ = await status_of(http, "POST", p.url + "/admin/anything")
        assert status in (404, 405)


async def test_the_admin_token_guards_every_admin_path(http: aiohttp.ClientSession):
    async with running_proxy(admin_token="adm-secret", api_key=["sk-one"]) as p:
        for method, path in (("GET", "/admin/instances"), ("POST", "/admin/anything")):
            status, payload, headers = await status_of(http, method, p.url + path)
            assert status == 401, path
            assert headers["WWW-Authenticate"] == "Bearer"
            assert_openai_error(payload, 401)
            for wrong in ("adm-secre", "adm-secret2", "sk-one"):  # a client key is not it
                status, _, _ = await status_of(http, method, p.url + path, headers=auth(wrong))
                assert status == 403, (path, wrong)
        ok = auth("adm-secret")
        assert (await status_of(http, "GET", p.url + "/admin/instances", headers=ok))[0] == 200
        status, _, _ = await status_of(http, "POST", p.url + "/admin/anything", headers=ok)
        assert status in (404, 405)
        # the admin token is not a client key either
        status, _, _ = await status_of(http, "GET", p.url + "/v1/models", headers=ok)
        assert status == 401


# ------------------------------------------------------------- what vLLM is sent


@pytest.mark.parametrize(
    ("settings", "client_key", "expected"),
    [
        ({}, None, None),
        ({"upstream_api_key": "fleet-key"}, None, "Bearer fleet-key"),
        ({"upstream_api_key": "fleet-key", "upstream_auth": "none"}, None, None),
        ({"upstream_auth": "passthrough"}, "sk-client", "Bearer sk-client"),
        ({"upstream_auth": "passthrough"}, None, None),
    ],
    ids=["none", "fleet", "fleet-off", "passthrough", "passthrough-no-key"],
)
@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_both_legs_carry_what_is_configured(
    http: aiohttp.ClientSession,
    settings: dict[str, str],
    client_key: str | None,
    expected: str | None,
    mode: str,
):
    async with running_proxy(**settings) as p:
        await pair(p, mode=mode)
        headers = auth(client_key) if client_key else {}
        for stream in (False, True):
            body = {**BODY, "stream": stream}
            async with http.post(p.url + "/v1/completions", json=body, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
        legs = [leg for sim in p.sims for leg in sim.legs]
        assert {leg.kind for leg in legs} == {"prefill", "decode"}
        assert len(legs) == 4
        for leg in legs:
            assert leg.headers.get("Authorization") == expected, leg.kind
        async with http.get(p.url + "/v1/models", headers=headers) as resp:
            assert resp.status == 200


# ------------------------------------------------------------------------- limits


async def test_a_max_tokens_ceiling_refuses_more_and_fills_in_a_missing_one(
    http: aiohttp.ClientSession,
):
    async with running_proxy(max_tokens_limit=6) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        status, payload, _ = await status_of(http, "POST", url, json={**BODY, "max_tokens": 7})
        assert status == 400
        assert payload["error"]["param"] == "max_tokens"
        assert "6" in payload["error"]["message"]
        chat = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}
        status, payload, _ = await status_of(
            http, "POST", p.url + "/v1/chat/completions", json={**chat, "max_completion_tokens": 9}
        )
        assert status == 400 and payload["error"]["param"] == "max_completion_tokens"
        assert p.sims[0].legs == []  # refused before any upstream call
        status, payload, _ = await status_of(http, "POST", url, json={**BODY, "max_tokens": 6})
        assert status == 200
        body = {k: v for k, v in BODY.items() if k != "max_tokens"}
        status, payload, _ = await status_of(http, "POST", url, json=body)
        assert status == 200
        assert payload["usage"]["completion_tokens"] == 6
        decode = [leg for leg in p.sims[1].legs if leg.kind == "decode"]
        assert decode[-1].body is not None and decode[-1].body["max_tokens"] == 6


async def test_a_key_over_its_in_flight_limit_gets_429_and_others_do_not(
    http: aiohttp.ClientSession,
):
    async with running_proxy(api_key=["sk-a", "sk-b"], max_inflight_per_key=1) as p:
        await pair(p, token_latency=0.05)
        url = p.url + "/v1/completions"
        long = {**BODY, "max_tokens": 40, "stream": True}
        async with http.post(url, json=long, headers=auth("sk-a")) as first:
            assert first.status == 200
            await first.content.readline()  # the stream is under way
            status, payload, headers = await status_of(
                http, "POST", url, json=BODY, headers=auth("sk-a")
            )
            assert status == 429
            assert headers["Retry-After"] == "1"
            assert_openai_error(payload, 429)
            status, _, _ = await status_of(http, "POST", url, json=BODY, headers=auth("sk-b"))
            assert status == 200
            await first.read()
        status, _, _ = await status_of(http, "POST", url, json=BODY, headers=auth("sk-a"))
        assert status == 200  # the slot came back when the stream ended
        assert p.state.limits.inflight(b"Bearer sk-a") == 0


async def test_a_key_over_its_rate_gets_429_with_retry_after(http: aiohttp.ClientSession):
    async with running_proxy(api_key=["sk-a", "sk-b"], rate_limit_per_key=0.5) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        assert (await status_of(http, "POST", url, json=BODY, headers=auth("sk-a")))[0] == 200
        status, payload, headers = await status_of(
            http, "POST", url, json=BODY, headers=auth("sk-a")
        )
        assert status == 429
        assert headers["Retry-After"] == "2"  # one token at 0.5/s
        assert "0.5 requests/s" in payload["error"]["message"]
        assert (await status_of(http, "POST", url, json=BODY, headers=auth("sk-b")))[0] == 200


async def test_without_keys_the_limits_count_the_client_address(http: aiohttp.ClientSession):
    async with running_proxy(rate_limit_per_key=0.5) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        assert (await status_of(http, "POST", url, json=BODY))[0] == 200
        assert (await status_of(http, "POST", url, json=BODY))[0] == 429


@pytest.mark.parametrize(("limit", "small", "large"), [(4096, 1000, 8192), (None, 30_000, 100_000)])
async def test_an_oversized_request_head_gets_431(
    http: aiohttp.ClientSession, limit: int | None, small: int, large: int
):
    """The proxy measures the head itself: Hypercorn's h11 bound lets a head that arrives
    in one or two reads through at up to about twice its figure."""
    settings = {"max_header_bytes": limit} if limit else {}
    async with running_proxy(**settings) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        status, _, _ = await status_of(http, "POST", url, json=BODY, headers={"X-Pad": "x" * small})
        assert status == 200
        padded = {"X-Pad": "x" * large}
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.post(url, json=BODY, headers=padded) as resp,
        ):
            assert resp.status == 431
            assert_openai_error(await resp.json(content_type=None), 431)
        assert sum(1 for s in p.sims for leg in s.legs) == 2  # only the first reached vLLM


async def test_requests_in_flight_are_not_slowed_by_refusals(http: aiohttp.ClientSession):
    """A flood of unauthenticated requests is answered 401 without touching the fleet."""
    async with running_proxy(api_key=["sk-a"]) as p:
        await pair(p)
        url = p.url + "/v1/completions"
        results = await asyncio.gather(
            *(status_of(http, "POST", url, json=BODY) for _ in range(20)),
            status_of(http, "POST", url, json=BODY, headers=auth("sk-a")),
        )
        assert [r[0] for r in results] == [401] * 20 + [200]
        assert len([leg for s in p.sims for leg in s.legs]) == 2


async def test_model_lists_and_version_probes_carry_the_fleet_key_too():
    """Every call through the upstream session (get_json: /v1/models, /version) carries
    the fleet key; a caller's own header (passthrough) replaces it for that call."""
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"version": "0.33.0"})

    app = web.Application()
    app.router.add_get("/version", record)
    upstream = build_upstream(load_config({"upstream_api_key": "fleet"}, env={}))
    async with serving(app) as base:
        await upstream.start()
        try:
            url = base + "/version"
            assert await upstream.get_json(url, 5.0) == {"version": "0.33.0"}
            await upstream.get_json(url, 5.0, {"Authorization": "Bearer sk-client"})
        finally:
            await upstream.close()
    assert seen == ["Bearer fleet", "Bearer sk-client"]


async def test_check_reaches_a_locked_proxy_over_tls_with_its_credentials(tmp_path: Path):
    """``moriio-proxy check`` with --api-key, --admin-token and --cacert: all OK; without
    them the locked paths fail instead of looking like a broken deployment."""
    ca = make_ca(tmp_path)
    async with running_proxy(
        api_key=["sk-a"],
        admin_token="adm-token-xyz",
        ready_requires_key=True,
        metrics_requires_key=True,
        certfile=ca.server.cert,
        keyfile=ca.server.key,
    ) as p:
        await pair(p)
        report = await run_check(
            p.url, timeout=5, api_key="sk-a", admin_token="adm-token-xyz", cafile=ca.ca
        )
        assert {r.status for r in report.results} == {"OK"}, report.to_text()
        locked = await run_check(p.url, timeout=5, cafile=ca.ca)
        assert locked.by_name("instances").status == "FAIL"
        assert "401" in locked.by_name("instances").message
    shown = report.to_text() + json.dumps(report.to_json())
    assert "sk-a" not in shown and "adm-token-xyz" not in shown


async def admin_command(*args: str) -> tuple[int, str, str]:
    """``moriio-proxy admin ARGS`` as a process: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moriio_proxy", "admin", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_admin_actions_behind_a_token(http: aiohttp.ClientSession):
    """The admin routes (drain here) and the profiler fan-out answer through the door with
    the token, from the command line and over HTTP, and not without it."""
    async with running_proxy(admin_token="adm-token-xyz") as p:
        await pair(p, profiler=True)
        address = p.sims[1].http_address
        code, _, err = await admin_command(p.url, "drain", "D", address)
        assert code == 1 and "401" in err
        entry = p.state.registry.get(("D", address))
        assert entry is not None and not entry.draining
        code, _, err = await admin_command(p.url, "--token", "adm-token-xyz", "drain", "D", address)
        assert (code, err) == (0, "")
        assert entry.draining
        status, payload, _ = await status_of(http, "POST", p.url + "/start_profile")
        assert status == 401
        assert_openai_error(payload, 401)
        status, payload, _ = await status_of(
            http, "POST", p.url + "/start_profile", headers=auth("adm-token-xyz")
        )
        assert status == 200 and payload["succeeded"] == 2
