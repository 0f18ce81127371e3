"""Property tests of the two parsers that take untrusted input, on a fixed budget.

- Registration (the discovery port takes anything from anyone who reaches it): any
  msgpack-able value, or any bytes on the socket, is a valid Instance or a counted
  RegistrationError, never another exception.
- Client requests: any JSON body is a clean RequestError (a 400), or two legs that keep
  the wire contract (docs/protocol.md §3): the prefill leg asks for one token and does not
  stream, each leg's kv_transfer_params are exactly the proxy's, and nothing the client
  put in kv_transfer_params survives in either leg.

Each property runs a fixed number of examples from a fixed seed (derandomize), with no
example database, so a CI run is bounded and repeats exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moriio_proxy.discovery import Discovery
from moriio_proxy.metrics import Metrics
from moriio_proxy.protocol import (
    ROLES,
    TRANSFER_MODES,
    ClientRequest,
    Instance,
    RegistrationError,
    RequestError,
    parse_client_request,
    parse_registration,
    split_host_port,
)
from moriio_proxy.registry import Registry
from moriio_proxy.security import apply_max_tokens_limit
from tests.harness.clock import ManualClock
from tests.harness.wire import P_RETURNED, chat_body, completion_body, decode, prefill

BUDGET = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ------------------------------------------------------------------- registration

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
MSGPACK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.text(max_size=12) | st.binary(max_size=12) | st.integers(-(2**63), 2**63 - 1),
            inner,
            max_size=6,
        )
    ),
    max_leaves=24,
)
HOSTS = st.sampled_from(["10.0.0.1", "::1", "[::1]", "host.example", "", " ", "a:b:c", "1.2.3.4%x"])
PORTS = st.one_of(
    st.integers(min_value=-2, max_value=70000), st.sampled_from(["80", " 8000 ", "x", "0"])
)
ADDRESSES = st.builds(lambda host, port: f"{host}:{port}", HOSTS, PORTS) | st.text(max_size=30)
ZMQ_ADDRESSES = st.builds(
    lambda host, a, b: f"host:{host},handshake:{a},notify:{b}", HOSTS, PORTS, PORTS
) | st.text(max_size=40)
# Near-valid heartbeats, so the fuzz gets past the first checks and into the fields.
HEARTBEATS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["P", "D", "register", "X", b"P"]) | SCALARS,
        "role": st.sampled_from(["P", "D", "Q"]) | SCALARS,
        "http_address": ADDRESSES | SCALARS,
        "zmq_address": ZMQ_ADDRESSES | SCALARS,
        "request_address": st.builds(lambda a: "https://" + a, ADDRESSES) | ADDRESSES,
        "handshake_port": PORTS | SCALARS,
        "notify_port": PORTS | SCALARS,
        "dp_size": st.integers(min_value=-1, max_value=5000) | st.sampled_from(["2", " 3 "]),
        "tp_size": st.integers(min_value=-1, max_value=5000) | SCALARS,
        "transfer_mode": st.sampled_from(["READ", "write", "Read", "BOTH"]) | SCALARS,
        "scheme": st.sampled_from(["http", "https", "HTTPS"]) | SCALARS,
    },
)


GOOD_HEARTBEAT = {
    "type": st.sampled_from(["P", "D"]),
    "http_address": st.sampled_from(["10.0.0.1:8000", "::1:9000", "[fe80::1]:80"]),
    "zmq_address": st.builds(
        lambda a, b: f"host:10.0.0.1,handshake:{a},notify:{b}",
        st.integers(1, 65535),
        st.integers(1, 65535),
    ),
    "dp_size": st.integers(1, 4096),
    "tp_size": st.integers(1, 4096),
    "transfer_mode": st.sampled_from(["READ", "WRITE", "read"]),
    "scheme": st.sampled_from(["http", "https"]),
}


@st.composite
def mutated(
    draw: st.DrawFn, good: dict[str, st.SearchStrategy[Any]], bad: st.SearchStrategy[Any]
) -> dict[str, Any]:
    """A valid map with up to three fields dropped or replaced: the fuzz spends its budget
    near the valid shape, where a parser's mistakes are, not on maps refused at once."""
    message = {key: draw(value) for key, value in good.items()}
    for key in draw(st.sets(st.sampled_from(sorted(good)), max_size=3)):
        if draw(st.booleans()):
            del message[key]
        else:
            message[key] = draw(bad)
    return message


NEAR_HEARTBEATS = mutated(GOOD_HEARTBEAT, SCALARS | ADDRESSES | PORTS)


def assert_valid(instance: Instance) -> None:
    assert instance.role in ROLES
    assert instance.transfer_mode in TRANSFER_MODES
    assert instance.scheme in ("http", "https")
    assert instance.dp_size >= 1 and instance.tp_size >= 1
    assert 0 < instance.handshake_port < 65536 and 0 < instance.notify_port < 65536
    host, port = split_host_port(instance.http_address)
    assert host and 0 < port < 65536
    assert instance.base_url.startswith(f"{instance.scheme}://")


@BUDGET
@given(MSGPACK | HEARTBEATS | NEAR_HEARTBEATS)
def test_any_registration_value_is_an_instance_or_a_registration_error(message: Any):
    try:
        instance = parse_registration(message)
    except RegistrationError as exc:
        assert exc.reason and str(exc)
        event(f"refused: {exc.reason}")
        return
    event("an instance")
    assert_valid(instance)


@BUDGET
@given(st.binary(max_size=200) | st.builds(msgpack.packb, MSGPACK | HEARTBEATS | NEAR_HEARTBEATS))
def test_any_bytes_on_the_discovery_port_are_counted_and_never_break_it(payload: bytes):
    registry = Registry(ttl=10.0, clock=ManualClock())
    metrics = Metrics()
    discovery = Discovery(registry, metrics, host="127.0.0.1", port=0)
    result = discovery.accept([b"id", payload], "10.0.0.9")
    assert result != "internal_error"
    for entry in registry.entries():
        assert_valid(entry.instance)
    assert result in ("added", "conflict") or registry.entries() == []


# --------------------------------------------------------------- client requests

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
TOKEN_COUNTS = st.integers(min_value=-2, max_value=5000) | JSON
CLIENT_PARAMS = (
    st.fixed_dictionaries(
        {},
        optional={
            key: JSON
            for key in (
                "do_remote_decode",
                "do_remote_prefill",
                "remote_host",
                "remote_engine_id",
                "remote_block_ids",
                "transfer_id",
                "remote_dp_rank",
            )
        },
    )
    | JSON
)
BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just("m") | JSON,
            "prompt": st.text(max_size=40)
            | st.lists(st.integers(min_value=0, max_value=50000), max_size=8)
            | st.lists(st.text(max_size=8), max_size=3)
            | JSON,
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
                max_size=2,
            )
            | JSON,
            "stream": st.booleans() | JSON,
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})
            | JSON,
            "max_tokens": TOKEN_COUNTS,
            "max_completion_tokens": TOKEN_COUNTS,
            "min_tokens": TOKEN_COUNTS,
            "n": st.sampled_from([1, 2, None]) | JSON,
            "stop": JSON,
            "kv_transfer_params": CLIENT_PARAMS,
        },
    )
    | JSON
)

GOOD_BODY = {
    "model": st.sampled_from(["m", "sim-model"]),
    "prompt": st.text(max_size=40) | st.lists(st.integers(0, 50000), min_size=1, max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
        min_size=1,
        max_size=2,
    ),
    "stream": st.booleans(),
    "max_tokens": st.integers(1, 5000),
    "max_completion_tokens": st.integers(1, 5000),
    "min_tokens": st.integers(0, 10),
    "stop": st.lists(st.text(max_size=5), max_size=2),
    "kv_transfer_params": CLIENT_PARAMS,
    "temperature": st.floats(0, 2),
}
NEAR_BODIES = mutated(GOOD_BODY, JSON)

REPLACED_ON_PREFILL = {
    "stream",
    "stream_options",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "kv_transfer_params",
}


def minimal(endpoint: str) -> ClientRequest:
    body = completion_body() if endpoint == "completions" else chat_body()
    return parse_client_request(endpoint, body)


def params_for_any_body(endpoint: str, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both legs' kv_transfer_params for a minimal request (tests/unit/protocol/test_legs.py
    pins them key by key): what every request must get, whatever its body says."""
    request = minimal(endpoint)
    return (
        prefill(request).body["kv_transfer_params"],
        decode(request, mode, params=P_RETURNED).body["kv_transfer_params"],
    )


@BUDGET
@given(
    BODIES | NEAR_BODIES,
    st.sampled_from(["completions", "chat"]),
    st.sampled_from(["READ", "WRITE"]),
    st.sampled_from([0, 1, 64]),
)
def test_any_json_body_is_a_clean_400_or_legs_that_keep_the_contract(
    value: Any, endpoint: str, mode: str, ceiling: int
):
    body = orjson.loads(orjson.dumps(value))  # exactly what the proxy would read
    try:
        request = parse_client_request(endpoint, body)
        if ceiling:
            apply_max_tokens_limit(request.body, ceiling)
    except RequestError as exc:
        assert isinstance(exc.message, str) and exc.message
        assert exc.param is None or isinstance(exc.param, str)
        event("refused with 400")
        return
    event("legs built")  # --hypothesis-show-statistics: how often the legs are reached
    sent = copy.deepcopy(request.body)

    prefill_params, decode_params = params_for_any_body(endpoint, mode)
    first = prefill(request)
    assert first.body["max_tokens"] == 1
    assert first.body["stream"] is False
    assert first.body["min_tokens"] == 1
    assert first.body.get("max_completion_tokens", 1) == 1
    assert "stream_options" not in first.body and "stop" not in first.body
    assert first.body["kv_transfer_params"] == prefill_params
    for key, item in sent.items():  # the rest of the client's body goes as it came
        if key not in REPLACED_ON_PREFILL:
            assert first.body[key] == item

    second = decode(request, mode, params=P_RETURNED)
    assert second.body["kv_transfer_params"] == decode_params
    assert {k: v for k, v in second.body.items() if k != "kv_transfer_params"} == {
        k: v for k, v in sent.items() if k != "kv_transfer_params"
    }
    if ceiling:
        wanted = [second.body.get(k) for k in ("max_tokens", "max_completion_tokens")]
        assert any(w is not None for w in wanted)
        assert all(w is None or 1 <= w <= ceiling for w in wanted)
    # the client's body is untouched by building the legs, and both legs serialise
    assert request.body == sent
    for leg in (first, second):
        orjson.dumps(leg.body)
        assert leg.headers["X-Request-Id"] == "rid"
        assert "Authorization" not in leg.headers


def test_the_budget_is_fixed():
    """A property that drew its examples at random could pass today and fail tomorrow."""
    assert BUDGET.derandomize and BUDGET.database is None and BUDGET.max_examples == 400


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_client_kv_transfer_params_never_reach_a_leg(endpoint: str, mode: str):
    """The property's central case, spelled out: a client that names another request's
    KV blocks gets the proxy's params in both legs."""
    hostile = {"remote_engine_id": "victim", "remote_block_ids": [[9]], "do_remote_prefill": True}
    body = completion_body() if endpoint == "completions" else chat_body()
    request = parse_client_request(endpoint, {**body, "kv_transfer_params": hostile})
    legs = (prefill(request), decode(request, mode, params=P_RETURNED))
    expected = params_for_any_body(endpoint, mode)
    assert tuple(leg.body["kv_transfer_params"] for leg in legs) == expected
    assert "victim" not in orjson.dumps([leg.body for leg in legs]).decode()
