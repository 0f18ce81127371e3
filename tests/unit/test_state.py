"""What ProxyState builds from the configuration: the access log and the optional tracer,
and the one line a missing ``otel`` extra gives."""

from __future__ import annotations

import sys

import pytest

from moriio_proxy.access_log import AccessLog
from moriio_proxy.cli import main
from moriio_proxy.config import ConfigError, load_config
from moriio_proxy.state import build_access_log, build_tracing
from moriio_proxy.tracing import Tracing


@pytest.fixture
def without_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the otel extra were not installed: importing OpenTelemetry fails."""
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "moriio_proxy.tracing", raising=False)


def test_the_access_log_is_text_json_or_nothing():
    assert build_access_log(load_config({}, env={})) is not None
    assert isinstance(
        build_access_log(load_config({"access_log_format": "JSON"}, env={})), AccessLog
    )
    assert build_access_log(load_config({}, env={"MORIIO_PROXY_ACCESS_LOG_FORMAT": "off"})) is None


def test_no_endpoint_means_no_tracer_even_without_the_extra(without_otel: None):
    assert build_tracing(load_config({}, env={})) is None


def test_an_endpoint_without_the_extra_is_one_clear_error(without_otel: None):
    config = load_config({"otlp_traces_endpoint": "http://collector:4318/v1/traces"}, env={})
    with pytest.raises(ConfigError) as caught:
        build_tracing(config)
    message = str(caught.value)
    assert message.startswith("--otlp-traces-endpoint: OpenTelemetry is not installed")
    assert "pip install 'moriio-proxy[otel]'" in message


def test_serve_stops_with_that_line_before_starting_anything(
    without_otel: None, capsys: pytest.CaptureFixture[str]
):
    code = main(["serve", "--otlp-traces-endpoint", "http://c:4318/v1/traces", "--workers", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'moriio-proxy[otel]'" in err[0]


def test_an_endpoint_with_the_extra_builds_an_otlp_tracer():
    config = load_config({"otlp_traces_endpoint": "http://127.0.0.1:9/v1/traces"}, env={})
    tracing = build_tracing(config)
    assert isinstance(tracing, Tracing)
    tracing.provider.shutdown()  # nothing was recorded: nothing is sent
