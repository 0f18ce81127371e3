"""SimConfig and SimFaults: validation, JSON round trips, and the ``moriio-proxy sim`` flags
that build them (no sockets: nothing is started)."""

from __future__ import annotations

import argparse
import math

import pytest

from moriio_proxy.cli import build_parser
from moriio_proxy.sim import SimConfig, SimFaults, SimInstance
from moriio_proxy.sim import command as sim_command


def test_sim_faults_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault field"):
        SimFaults.from_dict({"status_roles": "P"})
    with pytest.raises(ValueError, match="probability"):
        SimInstance(SimConfig(role="P", faults=SimFaults(probability=1.5)))
    f = SimFaults.from_dict({"stall_after_tokens": [3, 2], "stall_first_byte": "Infinity"})
    assert f.stall_after_tokens == (3, 2.0) and f.stall_first_byte == math.inf
    assert SimFaults.from_dict(f.to_dict()) == f


async def test_cli_flags_map_to_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SimConfig] = []

    async def fake_run_sim(config: SimConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(sim_command, "run_sim", fake_run_sim)
    args = build_parser().parse_args(
        [
            "sim",
            "--role",
            "P",
            "--fail-status",
            "503",
            "--die-after-tokens",
            "4",
            "--stall-first-byte",
            "inf",
            "--stall-after-tokens",
            "2:0.5",
            "--fault-probability",
            "0.3",
            "--control-port",
            "0",
            "--seed",
            "11",
            "--profiler",
        ]
    )
    assert await sim_command.run(args) == 0
    cfg = seen[0]
    assert cfg.control_port == 0 and cfg.seed == 11 and cfg.profiler
    assert cfg.faults == SimFaults(
        status=503,
        die_after_tokens=4,
        stall_first_byte=math.inf,
        stall_after_tokens=(2, 0.5),
        probability=0.3,
    )
    bad = argparse.Namespace(**dict(vars(args), stall_after_tokens="2"))
    with pytest.raises(ValueError, match="K:S"):
        await sim_command.run(bad)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"role": "X"}, "role"),
        ({"mode": "read"}, "mode"),
        ({"dp_size": 0}, "dp_size"),
        ({"tp_size": 0}, "tp_size"),
        ({"control_port": 70000}, "control_port"),
    ],
)
def test_sim_config_refuses_what_vllm_serve_would(changes: dict, fragment: str) -> None:
    config = SimConfig(**{"role": "P", **changes})
    with pytest.raises(ValueError, match=fragment):
        config.validate()
    with pytest.raises(ValueError, match=fragment):
        SimInstance(config)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("status", 200, "400-599"),
        ("status", True, "400-599"),
        ("die_after_tokens", -1, "integer >= 0"),
        ("stall_first_byte", "soon", "seconds"),
        ("stall_first_byte", float("nan"), "seconds"),
        ("stall_after_tokens", [1], "pair"),
        ("stall_after_tokens", [1, -2], "seconds"),
        ("refuse_connections", "yes", "boolean"),
        ("probability", 1.5, r"\[0, 1\]"),
    ],
)
def test_sim_faults_field_validation(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SimFaults.from_dict({field: value})


def test_sim_faults_json_round_trip_and_patch_semantics() -> None:
    f = SimFaults(status=503, stall_after_tokens=(2, math.inf), probability=0.5)
    data = f.to_dict()
    assert data["stall_after_tokens"] == [2, "inf"] and data["stall_first_byte"] is None
    assert SimFaults.from_dict(data) == f
    patched = SimFaults.from_dict({"die_after_tokens": 3}, base=f)
    assert patched.status == 503 and patched.die_after_tokens == 3
    assert f.die_after_tokens is None  # the base is copied, not changed
    replaced = SimFaults.from_dict({"die_after_tokens": 3})
    assert replaced.status is None and replaced.per_request
    cleared = SimFaults.from_dict({"refuse_connections": None, "probability": None}, base=f)
    assert cleared.refuse_connections is False and cleared.probability == 1.0
    assert not SimFaults(refuse_connections=True).per_request
    assert SimFaults(stall_first_byte=0).per_request
