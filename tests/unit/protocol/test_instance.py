"""``protocol.instance``: an Instance's key and URLs, IPv6 hosts bracketed where a URL needs it."""

from __future__ import annotations

from moriio_proxy.protocol import (
    parse_client_request,
    parse_registration,
)
from tests.harness.wire import P_HEARTBEAT, D, completion_body, prefill


def test_ipv6_http_address_is_bracketed_for_urls():
    instance = parse_registration(
        {
            **P_HEARTBEAT,
            "http_address": "::1:20005",
            "zmq_address": "host:::1,handshake:6301,notify:61005",
        }
    )
    assert instance.http_address == "::1:20005"
    assert instance.key == ("P", "::1:20005")
    assert instance.base_url == "http://[::1]:20005"
    assert instance.kv_host == "::1"
    assert instance.handshake_port == 6301
    assert instance.notify_port == 61005
    leg = prefill(parse_client_request("completions", completion_body()), p=instance, d=D)
    assert leg.url == "http://[::1]:20005/v1/completions"
