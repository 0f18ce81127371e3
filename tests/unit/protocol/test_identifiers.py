"""``protocol.identifiers``: the transfer id, the request-id sandwich both connectors parse,
and the public ids a client sees.
"""

from __future__ import annotations

import re

from moriio_proxy.disagg import new_nonce
from moriio_proxy.protocol import (
    new_request_id,
    new_transfer_id,
    parse_registration,
    parse_zmq_address,
    public_id,
)
from tests.harness.wire import NONCE, D, P

# Copied verbatim from vLLM 0.32 moriio_common.py: what each connector side runs on the
# X-Request-Id to find its peer (P parses the decode address, D the prefill address).
_PREFILL_ZMQ_RE = re.compile(r"___prefill_addr_(.+?)___decode_addr_")
_DECODE_ZMQ_RE = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}(?:-.*)?$")

TX_RE = re.compile(r"tx-[0-9a-f]{32}")


def test_request_id_sandwich_matches_vllm_regexes():
    rid = new_request_id(P, D, NONCE)
    assert re.fullmatch(
        r"___prefill_addr_host:10\.0\.0\.1,handshake:6301,notify:61005"
        r"___decode_addr_host:10\.0\.0\.2,handshake:7301,notify:7501_[0-9a-f]{32}",
        rid,
    )
    # P (producer) reads the decode address, D (consumer) the prefill address.
    decode_zmq = _DECODE_ZMQ_RE.search(rid).group(1)
    prefill_zmq = _PREFILL_ZMQ_RE.search(rid).group(1)
    assert decode_zmq == D.zmq_address
    assert prefill_zmq == P.zmq_address
    assert parse_zmq_address(decode_zmq) == ("10.0.0.2", 7301, 7501)
    assert parse_zmq_address(prefill_zmq) == ("10.0.0.1", 6301, 61005)


def test_request_id_sandwich_survives_vllm_wrapping():
    # vLLM wraps X-Request-Id as "cmpl-<id>-<seq>-<hex>" before the connector sees it.
    rid = new_request_id(P, D, NONCE)
    wrapped = f"cmpl-{rid}-0-1a2b3c4d"
    assert _DECODE_ZMQ_RE.search(wrapped).group(1) == D.zmq_address
    assert _PREFILL_ZMQ_RE.search(wrapped).group(1) == P.zmq_address


def test_request_id_sandwich_with_ipv6_hosts():
    p6 = parse_registration(
        {
            "type": "P",
            "http_address": "fd00::1:20005",
            "zmq_address": "host:fd00::1,handshake:6301,notify:61005",
            "dp_size": 1,
            "tp_size": 1,
            "transfer_mode": "READ",
        }
    )
    d6 = parse_registration(
        {
            "type": "D",
            "http_address": "::1:40005",
            "zmq_address": "host:::1,handshake:7301,notify:7501",
            "dp_size": 1,
            "tp_size": 1,
            "transfer_mode": "READ",
        }
    )
    rid = new_request_id(p6, d6, NONCE)
    assert parse_zmq_address(_DECODE_ZMQ_RE.search(rid).group(1)) == ("::1", 7301, 7501)
    assert parse_zmq_address(_PREFILL_ZMQ_RE.search(rid).group(1)) == ("fd00::1", 6301, 61005)


def test_ids_carry_the_requests_nonce():
    assert new_request_id(P, D, NONCE).endswith("_" + NONCE)
    assert TX_RE.fullmatch(new_transfer_id(NONCE))


def test_nonces_are_32_hex_and_fresh():
    nonces = [new_nonce() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces)
    assert len(set(nonces)) == len(nonces)


def test_public_id_never_carries_the_sandwich():
    assert public_id("chat", "abc") == "chatcmpl-abc"
    assert public_id("completions", "abc") == "cmpl-abc"
    assert "addr" not in public_id("chat", "abc")
