"""What the proxy knows of vLLM 0.32 and 0.33 (versions.py) and how it chooses pairs with
it (pairing.py): version answers, which prefill may serve with which decode, the KV-load
failure surface, the admin view's reasons. No sockets."""

from __future__ import annotations

import dataclasses

import msgpack
import orjson
import pytest

from moriio_proxy.discovery.mirror import apply_snapshot, encode_snapshot
from moriio_proxy.pairing import NoPairError, PairChooser, fitting_decodes, unpaired_reason
from moriio_proxy.policies import EMPTY, make_decode_policy, make_prefill_policy
from moriio_proxy.protocol import Instance, Role, TransferMode
from moriio_proxy.registry import Entry, Registry
from moriio_proxy.versions import (
    effective,
    is_kv_load_failure,
    label,
    maps_write_tp,
    pair_problem,
    parse_release,
    parse_version_answer,
)


def instance(role: Role, n: int, tp: int = 1, mode: TransferMode = "WRITE") -> Instance:
    return Instance(role, f"10.0.0.{n}:8000", f"10.0.0.{n}", 6301, 61005, 1, tp, mode)


def entry(role: Role, n: int, tp: int = 1, version: str | None = "0.33.0") -> Entry:
    made = Entry(instance(role, n, tp), first_seen=0.0, last_seen=0.0)
    made.set_version(version)
    return made


# ------------------------------------------------------------------------ GET /version


@pytest.mark.parametrize(
    ("text", "release"),
    [
        ("0.33.0", (0, 33)),
        ("0.32.0", (0, 32)),
        ("0.33.1rc1", (0, 33)),
        ("0.33.0+rocm711", (0, 33)),
        ("0.34.0.dev12+g1a2b3c", (0, 34)),
        ("v0.33.0", (0, 33)),
        ("1.2", (1, 2)),
        ("dev", None),
        ("", None),
        (None, None),
    ],
)
def test_the_leading_release_numbers_count(text: str | None, release: tuple[int, int]) -> None:
    assert parse_release(text) == release


def test_a_version_answer_is_vllms_shape_or_nothing() -> None:
    assert parse_version_answer({"version": "0.33.0"}) == "0.33.0"
    assert parse_version_answer({"version": " 0.32.0 "}) == "0.32.0"
    for bad in (None, [], "0.33.0", {}, {"version": 33}, {"version": "main"}, {"v": "0.33"}):
        assert parse_version_answer(bad) is None
    assert parse_version_answer({"version": "0.33." + "9" * 200}) is None  # not a release


def test_unknown_and_older_count_as_the_oldest_supported() -> None:
    assert effective(None) == effective((0, 31)) == effective((0, 32)) == (0, 32)
    assert effective((0, 33)) == (0, 33) and effective((0, 34)) == (0, 34)
    assert not maps_write_tp(None) and not maps_write_tp((0, 32))
    assert maps_write_tp((0, 33)) and maps_write_tp((1, 0))
    assert label(None) == "unknown (treated as 0.32)" and label("0.33.0") == "0.33.0"


# ----------------------------------------------------------------------------- pairing

V32, V33 = (0, 32), (0, 33)


def problem(mode: TransferMode, p_tp: int, d_tp: int, pv: object, dv: object) -> str | None:
    return pair_problem(instance("P", 1, p_tp), instance("D", 2, d_tp), mode, pv, dv)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
@pytest.mark.parametrize("version", [None, V32, V33])
def test_equal_tp_and_equal_versions_always_pair(mode: TransferMode, version: object) -> None:
    assert problem(mode, 2, 2, version, version) is None


@pytest.mark.parametrize(("pv", "dv"), [(V32, V32), (V33, V33), (V32, V33), (V33, V32)])
def test_read_mode_pairs_only_equal_tp(pv: object, dv: object) -> None:
    assert problem("READ", 2, 2, pv, dv) is None
    refused = problem("READ", 2, 4, pv, dv)
    assert refused is not None and refused.startswith("TP 2 (prefill) and 4 (decode) differ")
    assert "MLA" in refused


def test_write_mode_mixed_tp_needs_033_on_both_sides_and_divisible_sizes() -> None:
    assert problem("WRITE", 2, 4, V33, V33) is None  # fan-out
    assert problem("WRITE", 4, 2, V33, V33) is None  # fan-in
    assert problem("WRITE", 4, 1, (0, 34), V33) is None  # newer counts as 0.33
    for pv, dv in ((V32, V33), (V32, V32), (None, V33), (V32, None)):
        refused = problem("WRITE", 2, 4, pv, dv)
        assert refused is not None and "only when both run vLLM 0.33" in refused
    indivisible = problem("WRITE", 2, 3, V33, V33)
    assert indivisible is not None and "neither divides the other" in indivisible


@pytest.mark.parametrize("dv", [V32, None, (0, 31)])
def test_a_033_prefill_never_writes_to_an_older_or_unknown_decode(dv: object) -> None:
    refused = problem("WRITE", 1, 1, V33, dv)
    assert refused is not None and "write_failed" in refused
    assert problem("READ", 1, 1, V33, dv) is None  # READ sends no write_failed


def test_a_032_prefill_may_write_to_a_033_decode_of_equal_tp() -> None:
    assert problem("WRITE", 2, 2, V32, V33) is None
    assert problem("WRITE", 2, 2, None, V33) is None


def test_fitting_decodes_returns_the_same_list_for_a_uniform_fleet() -> None:
    decodes = [entry("D", 2), entry("D", 3)]
    assert fitting_decodes(entry("P", 1), decodes, "WRITE") is decodes
    mixed = [entry("D", 2, version="0.32.0"), entry("D", 3), entry("D", 4, tp=2)]
    assert fitting_decodes(entry("P", 1), mixed, "WRITE") == [mixed[1], mixed[2]]
    assert fitting_decodes(entry("P", 1, version="0.32.0"), mixed, "WRITE") == mixed[:2]


def chooser(*entries: Entry, policy: str = "round_robin") -> PairChooser:
    registry = Registry(10.0, clock=lambda: 0.0)
    for made in entries:
        registry.upsert(made.instance)
        registry.get(made.instance.key).set_version(made.vllm_version)  # type: ignore[union-attr]
    return PairChooser(registry, make_prefill_policy(policy), make_decode_policy(policy))


def test_the_decode_is_chosen_among_those_that_fit_the_chosen_prefill() -> None:
    pairs = chooser(entry("P", 1), entry("D", 2, version="0.32.0"), entry("D", 3))
    for _ in range(4):
        pair = pairs.choose(set(), EMPTY)
        assert pair.decode.instance.http_address == "10.0.0.3:8000"
        assert pair.mode == "WRITE"


def test_another_prefill_is_chosen_when_none_fits_the_first() -> None:
    pairs = chooser(
        entry("P", 1),  # 0.33: may not write to the 0.32 decode
        entry("P", 2, version="0.32.0"),
        entry("D", 3, version="0.32.0"),
    )
    for _ in range(4):  # round robin offers P 1 every other time
        pair = pairs.choose(set(), EMPTY)
        assert pair.prefill.instance.http_address == "10.0.0.2:8000"


def test_no_pair_that_can_work_says_why() -> None:
    pairs = chooser(entry("P", 1, tp=2), entry("D", 2, tp=4, version="0.32.0"))
    with pytest.raises(NoPairError) as raised:
        pairs.choose(set(), EMPTY)
    message = str(raised.value)
    assert message.startswith("no prefill and decode instance can work together: prefill ")
    assert "10.0.0.1:8000 with decode 10.0.0.2:8000" in message
    with pytest.raises(NoPairError, match="no decode instance is available"):
        pairs.choose({("D", "10.0.0.2:8000")}, EMPTY)


def test_the_admin_view_says_why_an_instance_pairs_with_nobody() -> None:
    p = entry("P", 1)
    old = entry("D", 2, version="0.32.0")
    unknown = entry("D", 3, version=None)
    why = unpaired_reason(p, [old, unknown], "WRITE")
    assert why is not None and why.startswith("no live decode instance can work with it: ")
    assert "10.0.0.2:8000, 10.0.0.3:8000: a vLLM 0.33 prefill must not write" in why
    assert unpaired_reason(old, [p], "WRITE") is not None
    assert unpaired_reason(p, [old, entry("D", 4)], "WRITE") is None  # one fits
    assert unpaired_reason(p, [], "WRITE") is None  # no peer: nothing to judge


def test_an_entry_keeps_its_version_and_the_snapshot_carries_it() -> None:
    made = entry("P", 1, version=None)
    assert made.release is None
    assert made.set_version("0.33.0+rocm") and made.release == (0, 33)
    assert not made.set_version("0.33.0+rocm")  # unchanged
    source = Registry(10.0, clock=lambda: 0.0)
    source.upsert(made.instance)
    source.upsert(instance("D", 2))
    source.get(made.instance.key).set_version("0.33.0+rocm")  # type: ignore[union-attr]
    replica = Registry(10.0, clock=lambda: 0.0)
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    p, d = replica.entries()
    assert (p.vllm_version, p.release) == ("0.33.0+rocm", (0, 33))
    assert (d.vllm_version, d.release) == (None, None)
    source.get(made.instance.key).set_version(None)  # type: ignore[union-attr]
    apply_snapshot(replica, msgpack.unpackb(encode_snapshot(source, {}), raw=False))
    assert replica.entries()[0].vllm_version is None


def test_a_restart_with_another_shape_is_signalled() -> None:
    registry = Registry(10.0, clock=lambda: 0.0)
    seen: list[Entry] = []
    registry.instance_updated.connect(lambda _s, entry: seen.append(entry), weak=False)
    registry.upsert(instance("P", 1))
    registry.upsert(instance("P", 1))  # a heartbeat: nothing changed
    assert seen == []
    assert registry.upsert(dataclasses.replace(instance("P", 1), tp_size=2)) == "updated"
    assert [e.instance.tp_size for e in seen] == [2]


# ------------------------------------------------------------------ KV-load failures

COMPLETIONS_EVENT = (
    b'{"error": {"message": "Internal server error", "type": "InternalServerError", '
    b'"param": null, "code": 500}}'
)
CHAT_EVENT = (
    b'{"error":{"message":"Internal server error","type":"InternalServerError",'
    b'"param":null,"code":500}}'
)


def test_the_kv_load_failure_is_recognised_however_it_is_spaced() -> None:
    assert is_kv_load_failure(500, orjson.loads(COMPLETIONS_EVENT))
    assert is_kv_load_failure(500, orjson.loads(CHAT_EVENT))


def test_other_failures_are_not_kv_load_failures() -> None:
    died = {"error": {"message": "The server had an error while processing your request."}}
    assert not is_kv_load_failure(500, died)  # an engine death
    assert not is_kv_load_failure(502, orjson.loads(CHAT_EVENT))
    assert not is_kv_load_failure(500, {"error": "Internal server error"})
    assert not is_kv_load_failure(500, None)
