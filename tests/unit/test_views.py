"""The /admin/instances contract: what the app writes is what ``check`` reads back.

``from_json`` parses answers of proxies ``check`` does not control, so every way an answer
can be malformed must come back as one ViewError naming the field, never as a crash.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest

from moriio_proxy.views import AdminInstances, InstanceView, JsonView, ViewError
from tests.harness.contract import INSTANCE_KEYS


def instance(**changes: Any) -> dict[str, Any]:
    doc = {
        "role": "D",
        "http_address": "10.0.0.2:8200",
        "zmq_address": "host:10.0.0.2,handshake:6301,notify:61005",
        "transfer_mode": "WRITE",
        "dp_size": 2,
        "tp_size": 1,
        "static": False,
        "age_seconds": 12.5,
        "seconds_since_heartbeat": 0.25,
        "state": "healthy",
        "consecutive_failures": 0,
        "inflight": 3,
        "inflight_by_dp_rank": [1, 2],
        "vllm_version": "0.33.0",
        "unpaired": None,
        "scheme": "http",
    }
    doc.update(changes)
    return doc


def answer(*instances: dict[str, Any], mode: str | None = "WRITE") -> dict[str, Any]:
    return {"transfer_mode": mode, "instances": list(instances)}


def test_round_trip_keeps_every_key_in_order() -> None:
    doc = answer(instance(), instance(role="P", static=True, seconds_since_heartbeat=None))
    view = AdminInstances.from_json(json.loads(json.dumps(doc)))
    assert view.to_json() == doc
    assert list(view.to_json()) == ["transfer_mode", "instances"]
    assert [list(i) for i in view.to_json()["instances"]] == [INSTANCE_KEYS, INSTANCE_KEYS]
    first = view.instances[0]
    assert first.inflight_by_dp_rank == (1, 2)
    assert first.seconds_since_heartbeat == 0.25
    assert view.instances[1].seconds_since_heartbeat is None


def test_no_mode_in_force_and_no_instances_parse() -> None:
    view = AdminInstances.from_json(answer(mode=None))
    assert view.transfer_mode is None and view.instances == ()


def test_tolerates_what_other_versions_send() -> None:
    doc = answer(instance(age_seconds=12, gpu_model="MI355X", state="draining"))
    doc["generation"] = 7
    (view,) = AdminInstances.from_json(doc).instances
    assert view.age_seconds == 12.0 and isinstance(view.age_seconds, float)
    assert view.state == "draining"  # a newer proxy's state reaches the reader
    assert "gpu_model" not in view.to_json()


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ([], "answer: expected a JSON object, got []"),
        ("<html>", "answer: expected a JSON object, got '<html>'"),
        ({"instances": []}, "transfer_mode is missing"),
        (answer(mode="BOTH"), "transfer_mode: expected one of 'READ', 'WRITE', got 'BOTH'"),
        ({"transfer_mode": "READ", "instances": {}}, "instances: expected a list, got {}"),
        (answer("x"), "instances[0]: expected a JSON object, got 'x'"),
        (answer(instance(), {}), "instances[1].role is missing"),
        (answer(instance(role="X")), "instances[0].role: expected one of 'P', 'D', got 'X'"),
        (answer(instance(role=None)), "instances[0].role: expected one of 'P', 'D', got null"),
        (answer(instance(dp_size="2")), "instances[0].dp_size: expected an integer, got '2'"),
        (answer(instance(dp_size=True)), "instances[0].dp_size: expected an integer, got True"),
        (answer(instance(tp_size=1.0)), "instances[0].tp_size: expected an integer, got 1.0"),
        (answer(instance(static="no")), "instances[0].static: expected true or false, got 'no'"),
        (answer(instance(static=0)), "instances[0].static: expected true or false, got 0"),
        (answer(instance(age_seconds="1")), "instances[0].age_seconds: expected a number"),
        (answer(instance(age_seconds=None)), "instances[0].age_seconds: expected a number"),
        (answer(instance(http_address=8200)), "instances[0].http_address: expected a string"),
        (answer(instance(state=None)), "instances[0].state: expected a string, got null"),
        (
            answer(instance(seconds_since_heartbeat="soon")),
            "instances[0].seconds_since_heartbeat: expected a number, got 'soon'",
        ),
        (
            answer(instance(inflight_by_dp_rank=[0, None])),
            "instances[0].inflight_by_dp_rank[1]: expected an integer, got null",
        ),
        (
            answer(instance(inflight_by_dp_rank=3)),
            "instances[0].inflight_by_dp_rank: expected a list, got 3",
        ),
    ],
)
def test_malformed_answers_name_the_field(doc: Any, error: str) -> None:
    with pytest.raises(ViewError) as raised:
        AdminInstances.from_json(copy.deepcopy(doc))
    assert str(raised.value).startswith(error)


def test_a_long_bad_value_is_shortened_in_the_error() -> None:
    with pytest.raises(ViewError) as raised:
        InstanceView.from_json(instance(http_address=["x" * 200]), "instance")
    assert len(str(raised.value)) < 120 and str(raised.value).endswith("...")


def test_a_new_field_is_one_annotated_attribute() -> None:
    @dataclass(frozen=True)
    class Newer(InstanceView):
        gpu_model: str | None = None

    old = Newer.from_json(instance())  # an older proxy's answer lacks the field
    assert old.gpu_model is None
    new = Newer.from_json(instance(gpu_model="MI355X"))
    assert new.gpu_model == "MI355X"
    assert list(new.to_json()) == [*INSTANCE_KEYS, "gpu_model"]
    with pytest.raises(ViewError, match=r"^gpu_model: expected a string, got 32$"):
        Newer.from_json(instance(gpu_model=32))


def test_a_field_type_the_contract_cannot_carry_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd(JsonView):
        labels: dict[str, str]

    with pytest.raises(TypeError, match="unsupported type"):
        Odd.from_json({"labels": {}})
