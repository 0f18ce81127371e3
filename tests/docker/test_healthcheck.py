"""docker/healthcheck.py, the proxy image's HEALTHCHECK, against real local HTTP servers."""

from __future__ import annotations

import http.server
import importlib.util
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from moriio_proxy.config import ProxyConfig
from tests.docker.support import DOCKER

SCRIPT = DOCKER / "healthcheck.py"


@contextmanager
def server(status_for: dict[str, int]) -> Iterator[int]:
    """A loopback HTTP server answering each path with its status (404 for others)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status_for.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthy_when_health_answers_200() -> None:
    with server({"/health": 200}) as port:
        result = check(MORIIO_PROXY_PORT=str(port))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("status", [503, 500])
def test_unhealthy_when_health_answers_an_error(status: int) -> None:
    with server({"/health": status}) as port:
        result = check(MORIIO_PROXY_PORT=str(port))
    assert result.returncode == 1
    assert f"/health: HTTP Error {status}" in result.stderr


def test_unhealthy_when_nothing_listens(dead_port: int) -> None:
    result = check(MORIIO_PROXY_PORT=str(dead_port))
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: GET http://127.0.0.1:")


def test_a_wildcard_bind_is_checked_on_loopback_and_http_proxies_are_bypassed() -> None:
    with server({"/health": 200}) as port:
        result = check(
            MORIIO_PROXY_HOST="0.0.0.0",
            MORIIO_PROXY_PORT=str(port),
            http_proxy="http://127.0.0.1:9",
            HTTP_PROXY="http://127.0.0.1:9",
        )
    assert result.returncode == 0, result.stderr


def test_the_default_address_is_the_proxys_default_port() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)
    assert spec and spec.loader
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    port = ProxyConfig().port
    assert healthcheck.health_url({}) == f"http://127.0.0.1:{port}/health"
    assert healthcheck.health_url({"MORIIO_PROXY_HOST": "::"}) == f"http://[::1]:{port}/health"
    custom = {"MORIIO_PROXY_HOST": "10.0.0.5", "MORIIO_PROXY_PORT": "8080"}
    assert healthcheck.health_url(custom) == "http://10.0.0.5:8080/health"
