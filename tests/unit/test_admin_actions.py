"""Operators' actions on registered instances: parsing a body, applying it to a registry."""

from __future__ import annotations

from typing import Any

import pytest

from moriio_proxy.admin.actions import (
    ActionError,
    Outcome,
    apply_action,
    apply_request,
    parse_action,
)
from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry
from tests.harness.clock import ManualClock

P = "10.0.0.1:20005"
D = "10.0.0.2:40005"


def instance(role: str, address: str, mode: str = "READ", dp: int = 1) -> Instance:
    return Instance(role, address, address.split(":")[0], 6301, 6105, dp, 1, mode)  # type: ignore[arg-type]


def registration(role: str = "D", address: str = D, mode: str = "READ") -> dict[str, Any]:
    host = address.split(":")[0]
    return {
        "type": role,
        "http_address": address,
        "zmq_address": f"host:{host},handshake:7301,notify:7501",
        "dp_size": 2,
        "tp_size": 1,
        "transfer_mode": mode,
    }


@pytest.fixture
def fleet(clock: ManualClock) -> Registry:
    registry = Registry(10.0, eject_seconds=30.0, clock=clock)
    registry.upsert(instance("P", P))
    registry.upsert(instance("D", D))
    registry.upsert(instance("D", "10.0.0.3:40005"))
    return registry


def act(registry: Registry, name: str, **body: Any) -> Outcome:
    return apply_action(registry, parse_action(name, body))


def routable(registry: Registry, role: str = "D") -> list[str]:
    return [e.instance.http_address for e in registry.routable(role)]  # type: ignore[arg-type]


# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("name", "body", "status", "message"),
    [
        ("reboot", {}, 404, "unknown action 'reboot'; one of: drain, undrain, eject, remove, add"),
        ("drain", [], 400, "the body must be a JSON object"),
        ("drain", {"http_address": D}, 400, "role must be 'P' or 'D', got None"),
        ("drain", {"role": "X", "http_address": D}, 400, "role must be 'P' or 'D', got 'X'"),
        ("drain", {"role": "D"}, 400, "http_address must be a string such as '10.0.0.2:8200'"),
        ("drain", {"role": "D", "http_address": "nohost"}, 400, "http_address: bad address"),
        (
            "drain",
            {"role": "D", "http_address": D, "seconds": 3},
            400,
            "unknown field(s) seconds; drain takes http_address, role",
        ),
        ("eject", {"role": "D", "http_address": D, "seconds": 0}, 400, "seconds must be above 0"),
        ("eject", {"role": "D", "http_address": D, "seconds": "5"}, 400, "seconds must be a num"),
        ("eject", {"role": "D", "http_address": D, "seconds": True}, 400, "seconds must be a num"),
        (
            "eject",
            {"role": "D", "http_address": D, "seconds": 1e9},
            400,
            "seconds must be above 0 and at most 86400",
        ),
        ("add", {"type": "D", "http_address": D}, 400, "not a usable instance: zmq_address"),
        ("add", {**registration(), "dp_size": 0}, 400, "not a usable instance: dp_size"),
        (
            "add",
            {**registration(), "transfer_mode": "PUSH"},
            400,
            "not a usable instance: transfer_mode",
        ),
    ],
)
def test_a_bad_request_is_refused_with_a_status_and_one_sentence(
    name: str, body: Any, status: int, message: str
) -> None:
    with pytest.raises(ActionError) as caught:
        parse_action(name, body)
    assert caught.value.status == status
    assert str(caught.value).startswith(message)


def test_a_good_request_names_its_instance() -> None:
    action = parse_action("eject", {"role": "D", "http_address": D, "seconds": 5})
    assert (action.key, action.seconds) == (("D", D), 5.0)
    assert parse_action("eject", {"role": "D", "http_address": D}).seconds is None
    added = parse_action("add", registration())
    assert added.key == ("D", D) and added.instance is not None
    assert added.instance.dp_size == 2 and added.instance.handshake_port == 7301


# ------------------------------------------------------------------------- applying


def test_drain_takes_an_instance_out_of_routing_and_undrain_brings_it_back(fleet: Registry):
    outcome = act(fleet, "drain", role="D", http_address=D)
    assert (outcome.status, outcome.message) == (
        200,
        f"draining D instance {D}: no new requests; those in flight finish",
    )
    assert routable(fleet) == ["10.0.0.3:40005"]
    assert [e.instance.http_address for e in fleet.healthy("D")] == [D, "10.0.0.3:40005"]
    assert act(fleet, "undrain", role="D", http_address=D).status == 200
    assert routable(fleet) == [D, "10.0.0.3:40005"]


def test_a_drain_survives_heartbeats_and_a_restart_with_another_shape(fleet: Registry):
    act(fleet, "drain", role="D", http_address=D)
    assert fleet.upsert(instance("D", D)) == "refreshed"
    assert fleet.upsert(instance("D", D, dp=4)) == "updated"
    assert routable(fleet) == ["10.0.0.3:40005"]


def test_no_panic_brings_back_a_drained_instance(fleet: Registry, clock: ManualClock):
    """Every decode ejected: all are tried again (panic), but never a drained one."""
    act(fleet, "drain", role="D", http_address=D)
    act(fleet, "eject", role="D", http_address="10.0.0.3:40005")
    assert routable(fleet) == ["10.0.0.3:40005"]  # the panic rule, among the undrained
    act(fleet, "drain", role="D", http_address="10.0.0.3:40005")
    assert routable(fleet) == []


def test_eject_rests_an_instance_for_the_seconds_given(fleet: Registry, clock: ManualClock):
    outcome = act(fleet, "eject", role="D", http_address=D, seconds=5)
    assert outcome.message == f"ejected D instance {D} for 5s"
    assert routable(fleet) == ["10.0.0.3:40005"]
    clock.advance(4.9)
    assert routable(fleet) == ["10.0.0.3:40005"]
    clock.advance(0.2)
    assert routable(fleet) == [D, "10.0.0.3:40005"]


def test_eject_without_seconds_rests_for_eject_seconds(fleet: Registry, clock: ManualClock):
    assert act(fleet, "eject", role="P", http_address=P).message.endswith("for 30s")
    entry = fleet.get(("P", P))
    assert entry is not None and fleet.is_ejected(entry)
    clock.advance(30.1)
    assert not fleet.is_ejected(entry)


def test_remove_forgets_an_instance_and_its_heartbeat_brings_it_back(fleet: Registry):
    removed: list[str] = []
    fleet.instance_removed.connect(
        lambda _s, entry, reason: removed.append(reason), sender=fleet, weak=False
    )
    outcome = act(fleet, "remove", role="D", http_address=D)
    assert (
        outcome.message
        == f"removed D instance {D}; if it still sends heartbeats, it registers again"
    )
    assert fleet.get(("D", D)) is None and removed == ["removed by an operator"]
    assert fleet.upsert(instance("D", D)) == "added"


@pytest.mark.parametrize("name", ["drain", "undrain", "eject", "remove"])
def test_an_unknown_instance_is_404(fleet: Registry, name: str):
    outcome = act(fleet, name, role="P", http_address=D)  # D's address, but as a prefill
    assert (outcome.status, outcome.message) == (404, f"no P instance {D} is registered")
    assert outcome.error()["error"] == {
        "message": f"no P instance {D} is registered",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_add_registers_a_static_instance_that_never_expires(clock: ManualClock):
    registry = Registry(10.0, clock=clock)
    outcome = act(registry, "add", **registration())
    assert (outcome.status, outcome.message) == (201, f"added D instance {D} (READ)")
    clock.advance(3600)
    assert routable(registry) == [D]
    entry = registry.get(("D", D))
    assert entry is not None and entry.static and entry.instance.dp_size == 2


def test_add_makes_a_discovered_instance_static(fleet: Registry, clock: ManualClock):
    outcome = act(fleet, "add", **registration())
    assert (outcome.status, outcome.message) == (200, f"now static: D instance {D} (READ)")
    clock.advance(3600)
    assert routable(fleet) == [D]


def test_add_in_the_other_transfer_mode_is_a_conflict(fleet: Registry):
    outcome = act(fleet, "add", **registration("P", "10.0.0.9:20005", mode="WRITE"))
    assert outcome.status == 409
    assert outcome.message == (
        "P instance 10.0.0.9:20005 uses transfer mode WRITE, but READ is in force"
    )
    assert fleet.get(("P", "10.0.0.9:20005")) is None


def test_apply_request_parses_and_applies_or_says_why_not(fleet: Registry):
    """The supervisor's entry point for an action a worker forwarded as it came."""
    assert apply_request(fleet, "drain", {"role": "D", "http_address": D}).status == 200
    assert routable(fleet) == ["10.0.0.3:40005"]
    refused = apply_request(fleet, "drain", {"role": "Q", "http_address": D})
    assert (refused.status, refused.message) == (400, "role must be 'P' or 'D', got 'Q'")


def test_an_outcome_travels_to_a_worker_unchanged():
    outcome = Outcome(409, "why", "P", P)
    assert Outcome.from_wire(outcome.to_wire()) == outcome
