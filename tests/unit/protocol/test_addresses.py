"""``protocol.addresses``: host:port and zmq addresses, IPv4 and IPv6."""

from __future__ import annotations

import pytest

from moriio_proxy.protocol import (
    parse_zmq_address,
    split_host_port,
)


def test_ipv6_zmq_host_splits_on_first_colon():
    assert parse_zmq_address("host:::1,handshake:6301,notify:61005") == ("::1", 6301, 61005)
    assert parse_zmq_address("host:fe80::2:3,handshake:1,notify:2") == ("fe80::2:3", 1, 2)


def test_split_host_port():
    assert split_host_port("10.0.0.1:80") == ("10.0.0.1", 80)
    assert split_host_port("fd00::1:20005") == ("fd00::1", 20005)
    assert split_host_port("[::1]:8000") == ("::1", 8000)
    for bad in ("10.0.0.1", ":80", "10.0.0.1:0", "10.0.0.1:65536", "h:x", "[::1]8000"):
        with pytest.raises(ValueError):
            split_host_port(bad)
