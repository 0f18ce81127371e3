"""moriio_proxy.testing reads the lines the commands really write (the serving line from
the CLI's own logger here; the simulator's line in tests/integration/sim/test_instance.py)."""

from __future__ import annotations

import logging

import pytest

from moriio_proxy.cli import _log_serving
from moriio_proxy.config import ProxyConfig
from moriio_proxy.testing import Serving, parse_serving, parse_sim_started


@pytest.mark.parametrize(
    ("config", "port", "discovery_port", "workers", "expected"),
    [
        (ProxyConfig(host="127.0.0.1"), 40123, 25001, 1, Serving("127.0.0.1", 40123, 1, 25001)),
        (ProxyConfig(host="0.0.0.0"), 10001, 36367, 4, Serving("0.0.0.0", 10001, 4, 36367)),
        (ProxyConfig(host="::"), 10001, 36367, 1, Serving("::", 10001, 1, 36367)),
        (ProxyConfig(discovery="kubernetes"), 10001, None, 2, Serving("0.0.0.0", 10001, 2, None)),
        (
            ProxyConfig(host="127.0.0.1", certfile="c.pem", keyfile="k.pem"),
            8443,
            25001,
            1,
            Serving("127.0.0.1", 8443, 1, 25001, scheme="https"),
        ),
    ],
    ids=["loopback", "workers", "ipv6", "kubernetes", "tls"],
)
def test_the_serving_line_the_cli_logs_is_read_back(
    config: ProxyConfig,
    port: int,
    discovery_port: int | None,
    workers: int,
    expected: Serving,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="moriio_proxy"):
        _log_serving(config, port, discovery_port, workers=workers)
    (record,) = [r for r in caplog.records if "serving" in r.getMessage()]
    assert parse_serving(f"INFO {record.getMessage()}\n") == expected


def test_urls_are_bracketed_for_ipv6() -> None:
    assert Serving("::1", 8000, 1, None).url == "http://[::1]:8000"
    assert Serving("127.0.0.1", 8000, 1, None).url == "http://127.0.0.1:8000"
    assert Serving("::1", 8443, 1, None, scheme="https").url == "https://[::1]:8443"


def test_other_lines_are_not_announcements() -> None:
    log = "discovery listening on tcp://127.0.0.1:25001\nmoriio-proxy sim: engine died: x\n"
    assert parse_serving(log) is None
    assert parse_sim_started(log) is None
