"""How a shutdown is logged: routine when idle, a warning when requests may be cut short."""

from __future__ import annotations

import logging

import pytest

from moriio_proxy.app import create_app, state
from moriio_proxy.config import load_config


def test_an_idle_shutdown_is_info(caplog: pytest.LogCaptureFixture):
    proxy = state(create_app(load_config({}, env={})))
    with caplog.at_level(logging.INFO, logger="moriio_proxy"):
        proxy.drain()
        proxy.drain()  # a second signal says nothing new
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "shutting down: nothing in flight")
    ]
    assert proxy.draining and proxy.not_ready() == "draining"


def test_a_shutdown_with_requests_in_flight_is_a_warning(caplog: pytest.LogCaptureFixture):
    proxy = state(create_app(load_config({"drain_timeout": "12"}, env={})))
    proxy.inflight = 3
    with caplog.at_level(logging.INFO, logger="moriio_proxy"):
        proxy.drain()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "draining: refusing new requests, waiting up to 12s for 3 in flight")
    ]
