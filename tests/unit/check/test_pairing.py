"""``check``'s pairing verdict: each instance's vLLM version, and the instances the proxy
pairs with nobody, from hand-made instance views."""

from __future__ import annotations

from typing import Any

from moriio_proxy.check import verdicts
from moriio_proxy.views import InstanceView
from tests.harness.entries import instance_view

WHY = "no live decode instance can work with it: 10.0.0.2:8200: TP 2 (prefill) and 4 ..."


def view(role: str = "P", port: int = 8100, **changes: Any) -> InstanceView:
    """An instance view of a WRITE fleet on vLLM 0.33 (the verdict tests' own, adapted)."""
    changes = {"transfer_mode": "WRITE", "vllm_version": "0.33.0", **changes}
    return instance_view(role, port, **changes)


def test_every_instance_paired_lists_the_versions() -> None:
    result = verdicts.pairing([view("P"), view("D", 8200, vllm_version="0.32.0")])
    assert result.status == "OK"
    assert result.message == "every instance can be paired; vLLM 0.32.0, 0.33.0"
    assert result.details == {
        "versions": {"P 10.0.0.2:8100": "0.33.0", "D 10.0.0.2:8200": "0.32.0"}
    }


def test_an_unpaired_instance_beside_working_ones_is_a_warning() -> None:
    listed = [view("P"), view("P", 8101, unpaired=WHY), view("D", 8200)]
    result = verdicts.pairing(listed)
    assert result.status == "WARN"
    assert result.message == f"not used: P 10.0.0.2:8101: {WHY}"
    assert "docs/protocol.md section 10" in result.hint


def test_a_role_with_no_usable_instance_fails() -> None:
    listed = [view("P", unpaired=WHY), view("D", 8200, unpaired="no live prefill ...")]
    result = verdicts.pairing(listed)
    assert result.status == "FAIL"
    assert result.message.startswith("no prefill or decode can be used: P 10.0.0.2:8100: ")


def test_a_stale_instance_is_not_judged() -> None:
    listed = [view("P"), view("P", 8101, state="stale", unpaired=WHY), view("D", 8200)]
    assert verdicts.pairing(listed).status == "OK"


def test_an_unsupported_release_is_a_warning() -> None:
    result = verdicts.pairing([view("P", vllm_version="0.34.0"), view("D", 8200)])
    assert result.status == "WARN"
    assert result.message == "not a supported vLLM release: P 10.0.0.2:8100 runs 0.34.0"


def test_an_unknown_version_beside_known_ones_is_a_warning() -> None:
    result = verdicts.pairing([view("P", vllm_version=None), view("D", 8200)])
    assert result.status == "WARN"
    assert "treats them as 0.32" in result.message and "P 10.0.0.2:8100" in result.message


def test_a_proxy_that_reports_no_version_is_fine() -> None:
    result = verdicts.pairing([view("P", vllm_version=None), view("D", 8200, vllm_version=None)])
    assert result.status == "OK"
    assert result.message == "every instance can be paired; no vLLM version reported"


def test_the_tp_warning_names_the_proxys_rule() -> None:
    result = verdicts.parallelism([view("P", tp_size=2), view("D", 8200, tp_size=4)])
    assert result.status == "WARN"
    assert "only in WRITE mode with vLLM 0.33 or later on both sides" in result.message
