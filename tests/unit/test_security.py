"""The security settings and the pieces behind them, without sockets: how keys and tokens
are configured (and never echoed), the key ring and its reload, the admin guard's rules,
the per-client limits and the max_tokens ceiling."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from moriio_proxy.cli import build_parser
from moriio_proxy.cli import main as cli_main
from moriio_proxy.config import ConfigError, load_config
from moriio_proxy.protocol import RequestError, parse_registration
from moriio_proxy.registry import Registry
from moriio_proxy.security import (
    AccessGuard,
    KeyFileError,
    KeyLimits,
    KeyRing,
    apply_max_tokens_limit,
)
from moriio_proxy.state import upstream_headers
from tests.harness.clock import ManualClock

# ------------------------------------------------------------------- configuration


def serve_args(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["serve", *argv])
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def test_api_key_is_repeatable_as_vllm_spells_it_and_comma_separated_in_the_env():
    config = load_config(serve_args("--api-key", "sk-a", "--api-key", "sk-b"), env={})
    assert config.api_key == ("sk-a", "sk-b")
    several = serve_args("--api-key", "sk-a", "sk-b", "--api-key", "sk-c", "--port", "1")
    assert load_config(several, env={}).api_key == ("sk-a", "sk-b", "sk-c")
    assert load_config(env={"MORIIO_PROXY_API_KEY": "sk-a, sk-b"}).api_key == ("sk-a", "sk-b")


def test_switches_take_no_value_on_the_command_line_and_words_elsewhere(tmp_path: Path):
    assert load_config(serve_args("--admin-allow-localhost"), env={}).admin_allow_localhost
    assert not load_config(serve_args(), env={}).admin_allow_localhost
    assert load_config(env={"MORIIO_PROXY_READY_REQUIRES_KEY": "yes"}).ready_requires_key
    path = tmp_path / "proxy.yaml"
    path.write_text("metrics_requires_key: true\napi_key: [sk-a]\n", encoding="utf-8")
    config = load_config(env={}, config_file=path)
    assert config.metrics_requires_key and config.api_key == ("sk-a",)
    with pytest.raises(ConfigError, match="MORIIO_PROXY_ADMIN_ALLOW_LOCALHOST: must be true"):
        load_config(env={"MORIIO_PROXY_ADMIN_ALLOW_LOCALHOST": "maybe"})


def test_secrets_stay_out_of_repr_and_error_messages():
    config = load_config(
        {"api_key": ["sk-visible"], "upstream_api_key": "up-visible", "admin_token": "adm-vis"},
        env={},
    )
    assert "visible" not in repr(config) and "adm-vis" not in repr(config)
    with pytest.raises(ConfigError) as raised:
        load_config({"api_key": ["sk with space"]}, env={})
    assert "--api-key: must be printable ASCII" in str(raised.value)
    assert "sk with space" not in str(raised.value)


def test_settings_that_only_make_sense_together():
    with pytest.raises(ConfigError, match="passthrough"):
        load_config({"upstream_auth": "passthrough", "upstream_api_key": "k"}, env={})
    with pytest.raises(ConfigError, match="--upstream-client-cert and --upstream-client-key"):
        load_config({"upstream_client_cert": "c.pem"}, env={})
    with pytest.raises(ConfigError, match="--rate-limit-per-key"):
        load_config({"rate_limit_per_key": "-1"}, env={})


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {}),
        ({"upstream_api_key": "fleet"}, {"Authorization": "Bearer fleet"}),
        ({"upstream_api_key": "fleet", "upstream_auth": "none"}, {}),
        ({"upstream_auth": "passthrough"}, {}),  # the client's header rides on each leg
    ],
)
def test_the_upstream_session_headers(settings: dict[str, str], expected: dict[str, str]):
    headers = upstream_headers(load_config(settings, env={}))
    assert headers == expected
    assert "None" not in str(headers)


# ------------------------------------------------------------------------ key ring


def test_the_key_ring_matches_whole_bearer_values_only(tmp_path: Path):
    ring = KeyRing(["sk-a"], "")
    assert ring.enabled and len(ring) == 1
    assert ring.match(b"Bearer sk-a") == b"Bearer sk-a"
    assert ring.match(b"bearer sk-a") == ring.match(b"BEARER sk-a") == b"Bearer sk-a"
    for wrong in (None, b"", b"Bearer sk-", b"Bearer sk-ab", b"bearer", b"sk-a", b"Basic sk-a"):
        assert ring.match(wrong) is None, wrong
    assert not KeyRing().enabled
    assert KeyRing().match(b"Bearer anything") is None


def test_the_keys_file_skips_comments_and_blank_lines(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text("# ops\n\n  sk-1  \nsk-2 # team b\nsk-1\n", encoding="utf-8")
    ring = KeyRing(["sk-0"], str(path))
    assert len(ring) == 3  # duplicates count once
    assert all(ring.match(f"Bearer sk-{n}".encode()) for n in range(3))


def test_an_empty_keys_file_locks_everyone_out_rather_than_opening_the_proxy(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text("# nobody yet\n", encoding="utf-8")
    ring = KeyRing((), str(path))
    assert ring.enabled and len(ring) == 0
    assert ring.match(b"Bearer ") is None


def test_a_bad_keys_file_names_the_line_and_not_its_content(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text("sk-ok\nsk bad key\n", encoding="utf-8")
    with pytest.raises(KeyFileError) as raised:
        KeyRing((), str(path))
    assert "line 2" in str(raised.value) and "bad key" not in str(raised.value)
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing((), str(tmp_path / "missing"))


def test_reload_swaps_the_file_keys_and_a_failed_one_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "keys"
    path.write_text("sk-old\n", encoding="utf-8")
    ring = KeyRing(["sk-fixed"], str(path))
    path.write_text("sk-new\n", encoding="utf-8")
    assert ring.reload()
    assert ring.match(b"Bearer sk-new") and ring.match(b"Bearer sk-fixed")
    assert ring.match(b"Bearer sk-old") is None
    path.unlink()
    assert not ring.reload()
    assert ring.match(b"Bearer sk-new")
    assert "keeping the 2 keys in force" in caplog.text
    assert "sk-" not in caplog.text


# ----------------------------------------------------------------------- the guard


class Recorder:
    """An ASGI app and a ``send`` that note what happened."""

    def __init__(self) -> None:
        self.reached = 0
        self.sent: list[dict[str, Any]] = []

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached += 1

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None


def call(
    guard_settings: dict[str, Any],
    method: str,
    path: str,
    *,
    authorization: str | None = None,
    client: str = "10.1.2.3",
    keys: KeyRing | None = None,
) -> Recorder:
    recorder = Recorder()
    guard = AccessGuard(recorder.app, keys or KeyRing(), **guard_settings)
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    scope["client"] = (client, 50000)
    asyncio.run(guard(scope, _receive, recorder.send))
    return recorder


async def _receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_an_admin_route_nobody_wrote_yet_is_guarded(method: str):
    """The guard is keyed on the path prefix and the method, not on a list of routes."""
    assert call({}, method, "/admin/anything").status == 403
    assert call({}, method, "/admin/anything/deeper").status == 403
    assert call({"admin_token": "t"}, method, "/admin/anything").status == 401
    wrong = call({"admin_token": "t"}, method, "/admin/anything", authorization="Bearer u")
    assert wrong.status == 403
    right = call({"admin_token": "t"}, method, "/admin/anything", authorization="Bearer t")
    assert right.status is None and right.reached == 1
    lower = call({"admin_token": "t"}, method, "/admin/anything", authorization="bearer t")
    assert lower.reached == 1


def test_without_a_token_reads_pass_and_loopback_is_let_in_only_when_allowed():
    assert call({}, "GET", "/admin/instances").reached == 1
    assert call({}, "HEAD", "/admin").reached == 1
    assert call({}, "GET", "/start_profile").status == 403  # never a read
    for loopback in ("127.0.0.1", "::1", "127.8.0.1"):
        assert call({}, "POST", "/admin/x", client=loopback).status == 403
        allowed = call({"allow_localhost": True}, "POST", "/stop_profile", client=loopback)
        assert allowed.reached == 1, loopback
    assert call({"allow_localhost": True}, "POST", "/admin/x").status == 403
    assert call({"allow_localhost": True}, "POST", "/admin/x", client="").status == 403


def test_paths_that_only_look_like_admin_ones_are_not_its_business():
    for path in ("/administrator", "/v2/admin/x", "/health"):
        assert call({"admin_token": "t"}, "POST", path).reached == 1, path


def test_client_keys_guard_v1_and_the_probes_asked_for():
    keys = KeyRing(["sk-a"])
    settings: dict[str, Any] = {"keyed_paths": frozenset({"/ready"})}
    assert call(settings, "GET", "/v1/models", keys=keys).status == 401
    assert call(settings, "GET", "/ready", keys=keys).status == 401
    assert call(settings, "GET", "/metrics", keys=keys).reached == 1
    assert call(settings, "GET", "/health", keys=keys).reached == 1
    ok = call(settings, "GET", "/v1/models", keys=keys, authorization="Bearer sk-a")
    assert ok.reached == 1
    refused = call(settings, "GET", "/v1/models", keys=keys)
    assert (b"www-authenticate", b"Bearer") in refused.sent[0]["headers"]


def test_the_guard_measures_the_request_head():
    small = call({"max_head": 200}, "GET", "/health")
    assert small.reached == 1
    recorder = Recorder()
    guard = AccessGuard(recorder.app, KeyRing(), max_head=100)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/health",
        "raw_path": b"/health",
        "query_string": b"q=" + b"y" * 50,
        "headers": [(b"x-pad", b"y" * 40)],
    }
    asyncio.run(guard(scope, _receive, recorder.send))
    assert recorder.status == 431 and recorder.reached == 0


# ------------------------------------------------------------------------- limits


def test_in_flight_per_client_comes_back_on_release():
    limits = KeyLimits(max_inflight=2)
    assert limits.admit("a") is None and limits.admit("a") is None
    refused = limits.admit("a")
    assert refused is not None and refused[1] == 1
    assert limits.admit("b") is None
    limits.release("a")
    assert limits.admit("a") is None
    for _ in range(3):
        limits.release("a")
    assert limits.inflight("a") == 0 and limits.admit("a") is None


def test_the_token_bucket_allows_a_burst_then_the_rate(clock: ManualClock):
    limits = KeyLimits(rate=2.0, clock=clock)
    assert [limits.admit("a") is None for _ in range(3)] == [True, True, False]
    refused = limits.admit("a")
    assert refused is not None and refused[1] == 1 and "2 requests/s" in refused[0]
    clock.advance(0.5)
    assert limits.admit("a") is None  # one token back
    assert limits.admit("a") is not None
    slow = KeyLimits(rate=0.25, clock=clock)
    assert slow.admit("a") is None
    refused = slow.admit("a")
    assert refused is not None and refused[1] == 4  # Retry-After: when a token is back


def test_idle_clients_are_forgotten_when_many_were_seen(clock: ManualClock):
    limits = KeyLimits(rate=1.0, clock=clock)
    for n in range(5000):
        limits.admit(n)
        limits.release(n)
    clock.advance(5)
    limits.admit("late")
    assert len(limits._buckets) < 5000


def test_the_max_tokens_ceiling():
    body: dict[str, Any] = {"max_tokens": 10}
    apply_max_tokens_limit(body, 10)
    assert body == {"max_tokens": 10}
    with pytest.raises(RequestError) as raised:
        apply_max_tokens_limit({"max_completion_tokens": 11}, 10)
    assert raised.value.param == "max_completion_tokens"
    empty: dict[str, Any] = {"max_tokens": None}
    apply_max_tokens_limit(empty, 10)
    assert empty == {"max_tokens": 10}
    both: dict[str, Any] = {"max_completion_tokens": 3}
    apply_max_tokens_limit(both, 10)
    assert both == {"max_completion_tokens": 3}


# --------------------------------------------------------------------- the scheme


def test_the_scheme_comes_from_the_config_or_a_static_https_address():
    beat = {
        "type": "P",
        "http_address": "10.0.0.1:8000",
        "zmq_address": "host:10.0.0.1,handshake:1,notify:2",
        "transfer_mode": "READ",
    }
    plain = parse_registration(beat)
    assert plain.base_url == "http://10.0.0.1:8000"
    registry = Registry(10.0, https=True)
    registry.upsert(plain)
    (entry,) = registry.entries()
    assert entry.instance.base_url == "https://10.0.0.1:8000"
    assert registry.upsert(plain) == "refreshed"  # a heartbeat is not a change of shape
    listed = parse_registration(
        {
            "type": "register",
            "role": "D",
            "request_address": "https://10.0.0.2:9000/v1/completions",
            "handshake_port": 1,
            "notify_port": 2,
            "transfer_mode": "READ",
        }
    )
    assert listed.base_url == "https://10.0.0.2:9000"
    assert parse_registration({**beat, "scheme": "https"}).scheme == "https"
    with pytest.raises(ValueError, match="scheme"):
        parse_registration({**beat, "scheme": "ftp"})


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unreadable_keys_file_stops_serve_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
):
    code = cli_main(
        ["serve", "--workers", workers, "--api-key-file", str(tmp_path / "missing"), "--port", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("moriio-proxy: error: --api-key-file: cannot read")
    assert len(err.strip().splitlines()) == 1
