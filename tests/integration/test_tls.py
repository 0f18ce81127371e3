"""TLS at both edges against a CA made in the test (tests/harness/certs.py): the proxy
serving HTTPS, requiring client certificates (mTLS), and reaching simulated vLLM
instances that serve HTTPS."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from moriio_proxy.check import run_check
from moriio_proxy.config import ConfigError, load_config
from moriio_proxy.protocol import parse_registration
from moriio_proxy.security import server_tls, upstream_ssl_context
from moriio_proxy.sim import SimConfig, SimInstance, expected_text
from tests.harness import eventually, running_proxy
from tests.harness.certs import Authority, make_ca
from tests.harness.serve import serve_process

PROMPT = "The quick brown fox jumps over the lazy dog"
BODY = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4}


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return make_ca(tmp_path)


def client_context(ca: Authority, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def get_status(url: str, context: ssl.SSLContext | bool) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as resp:
        return resp.status


async def test_the_proxy_serves_https(ca: Authority):
    async with running_proxy(certfile=ca.server.cert, keyfile=ca.server.key) as p:
        assert p.url.startswith("https://")
        assert await get_status(p.url + "/health", client_context(ca)) == 200
        # a client that does not trust the CA refuses the certificate
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get_status(p.url + "/health", ssl.create_default_context())
        # and plain HTTP on the TLS port gets no answer
        with pytest.raises(aiohttp.ClientError):
            await get_status(p.url.replace("https://", "http://") + "/health", False)


async def test_mutual_tls_needs_a_certificate_the_ca_signed(ca: Authority):
    async with running_proxy(certfile=ca.server.cert, keyfile=ca.server.key, ca_certs=ca.ca) as p:
        url = p.url + "/health"
        signed = client_context(ca, (ca.client.cert, ca.client.key))
        assert await get_status(url, signed) == 200
        for refused in (
            client_context(ca),  # no client certificate
            client_context(ca, (ca.stranger.cert, ca.stranger.key)),  # another CA's
        ):
            with pytest.raises(aiohttp.ClientError):
                await get_status(url, refused)


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_https_instances_through_a_ca_bundle(ca: Authority, mode: str):
    tls = {"ssl_certfile": ca.server.cert, "ssl_keyfile": ca.server.key}
    async with running_proxy(upstream_scheme="https", upstream_ca_bundle=ca.ca) as p:
        prefill = await p.add_sim("P", mode=mode, **tls)
        await p.add_sim("D", mode=mode, **tls)
        assert prefill.url.startswith("https://")
        await p.wait_registered(1, 1)  # the version probe went over TLS too
        entries = p.state.registry.entries()
        assert {e.instance.base_url.split("://")[0] for e in entries} == {"https"}
        async with aiohttp.ClientSession() as http:
            for stream in (False, True):
                body = {**BODY, "stream": stream}
                async with http.post(p.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    text = await resp.text()
                if not stream:
                    assert expected_text(PROMPT, 4) in text
            async with http.get(p.url + "/v1/models") as resp:
                assert resp.status == 200
            async with http.get(p.url + "/admin/instances") as resp:
                listed = (await resp.json())["instances"]
            assert {i["scheme"] for i in listed} == {"https"}
        assert len([leg for s in p.sims for leg in s.legs]) == 4
        # check reaches the instances as the proxy does: over TLS, through the same CA
        report = await run_check(p.url, timeout=10, cafile=ca.ca)
        reached = [r for r in report.results if r.name.startswith("reach ")]
        assert len(reached) == 2 and {r.status for r in reached} == {"OK"}, report.results


async def test_an_https_instance_the_bundle_does_not_vouch_for_is_not_used(
    ca: Authority, tmp_path: Path
):
    (tmp_path / "other").mkdir()
    other = make_ca(tmp_path / "other")
    tls = {"ssl_certfile": ca.server.cert, "ssl_keyfile": ca.server.key}
    async with running_proxy(
        upstream_scheme="https", upstream_ca_bundle=other.ca, max_retries=0
    ) as p:
        await p.add_sim("P", **tls)
        await p.add_sim("D", **tls)
        await p.wait_for(lambda: len(p.state.registry.entries()) == 2)
        async with (
            aiohttp.ClientSession() as http,
            http.post(p.url + "/v1/completions", json=BODY) as resp,
        ):
            assert resp.status == 502
            payload = await resp.json()
        # the certificate check failed the connection: no request reached an instance
        assert payload["error"]["message"] == "the prefill instance failed: unreachable"
        assert [leg for s in p.sims for leg in s.legs] == []  # no request got through


def test_bad_certificate_files_are_one_line_naming_the_flag(ca: Authority, tmp_path: Path):
    missing = str(tmp_path / "missing.pem")
    cases = {
        "--certfile/--keyfile": {"certfile": missing, "keyfile": ca.server.key},
        "--ca-certs": {"certfile": ca.server.cert, "keyfile": ca.server.key, "ca_certs": missing},
    }
    for flag, settings in cases.items():
        with pytest.raises(ConfigError, match=flag):
            server_tls(load_config(settings, env={}))
    with pytest.raises(ConfigError, match="--certfile/--keyfile: not a PEM"):
        server_tls(load_config({"certfile": ca.ca, "keyfile": ca.ca}, env={}))
    with pytest.raises(ConfigError, match="--upstream-ca-bundle"):
        upstream_ssl_context(load_config({"upstream_ca_bundle": missing}, env={}))
    with pytest.raises(ConfigError, match="go together"):
        load_config({"certfile": ca.server.cert}, env={})
    with pytest.raises(ConfigError, match="--ca-certs"):
        load_config({"ca_certs": ca.ca}, env={})


def test_an_upstream_client_certificate_is_loaded(ca: Authority):
    config = load_config(
        {
            "upstream_ca_bundle": ca.ca,
            "upstream_client_cert": ca.client.cert,
            "upstream_client_key": ca.client.key,
        },
        env={},
    )
    context = upstream_ssl_context(config)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert upstream_ssl_context(load_config({}, env={})) is None


async def test_every_worker_serves_https(ca: Authority):
    """``serve --workers 2``: the workers (not only a one-process proxy) load the
    certificate and require the client CA."""
    async with serve_process(
        "--workers",
        "2",
        "--certfile",
        ca.server.cert,
        "--keyfile",
        ca.server.key,
        "--ca-certs",
        ca.ca,
    ) as running:
        assert running.url.startswith("https://")
        signed = client_context(ca, (ca.client.cert, ca.client.key))

        async def all_answer() -> bool:
            for _ in range(8):  # fresh connections: the kernel spreads them over the workers
                try:
                    if await get_status(running.url + "/health", signed) != 200:
                        return False
                except aiohttp.ClientError:
                    return False
            return True

        await eventually(all_answer, what="every worker answering over mTLS")
        for _ in range(8):
            with pytest.raises(aiohttp.ClientError):
                await get_status(running.url + "/health", client_context(ca))


async def test_static_instances_listed_with_https_need_no_scheme_flag(ca: Authority):
    """A static instance in the older shape with an https:// request_address is reached
    over TLS while --upstream-scheme stays http."""
    tls = {"ssl_certfile": ca.server.cert, "ssl_keyfile": ca.server.key}
    sims = [SimInstance(SimConfig(role=role, proxy=None, **tls)) for role in "PD"]
    for sim in sims:
        await sim.start()
    try:
        statics = [
            parse_registration(
                {
                    "type": "register",
                    "role": sim.config.role,
                    "request_address": sim.url + "/v1/completions",
                    "handshake_port": sim.handshake_base,
                    "notify_port": sim.notify_base,
                    "transfer_mode": sim.config.mode,
                }
            )
            for sim in sims
        ]
        assert {s.scheme for s in statics} == {"https"}
        async with (
            running_proxy(static_instances=statics, upstream_ca_bundle=ca.ca) as p,
            aiohttp.ClientSession() as http,
            http.post(p.url + "/v1/completions", json=BODY) as resp,
        ):
            assert resp.status == 200, await resp.text()
            assert expected_text(PROMPT, 4) in await resp.text()
    finally:
        for sim in sims:
            await sim.stop()
    assert len([leg for s in sims for leg in s.legs]) == 2
