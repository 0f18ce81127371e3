"""The proxy with real vLLM MoRI-IO instances on MI300X/MI355X nodes with RDMA NICs.

Each serving scenario (see ``tests/gpu/plan.py``) is deployed once with the deploy scripts,
sent the same greedy prompts as a plain vLLM instance, measured, and torn down; the tests
below then judge that one run from different sides. The failover test deploys its own
scenario. Runbook and what each test proves: ``tests/gpu/README.md``. Without the hardware,
every test here skips with one reason line (the ``gpu`` fixture).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from moriio_proxy.check import Report, run_check
from tests.gpu.conftest import GpuContext
from tests.gpu.evidence import (
    PROMPT_TOKENS,
    KvEvidence,
    delta,
    delta_by_label,
    greedy_problem,
    kv_evidence,
    kv_problems,
    parse_metrics,
)
from tests.gpu.plan import LaunchPlan, reference_launch
from tests.gpu.runtime import PROMPTS, Completion, Deployment, Reference, wait_until

pytestmark = pytest.mark.gpu

SERVING = ("read-1p1d", "write-1p1d", "dp-prefill", "tp")


@dataclass(frozen=True)
class ServedRun:
    """Everything one serving scenario produced, gathered before its teardown."""

    plan: LaunchPlan
    block_size: int
    min_match: float
    expected: list[Completion]
    answers: list[Completion]
    streamed: Completion
    decode_kv: KvEvidence
    prefill_kv: KvEvidence
    prefill_rank_tokens: dict[str, float]
    admin: dict[str, Any]
    check: Report
    diagnostics: str


@pytest.fixture(scope="module", params=SERVING)
def served(request: pytest.FixtureRequest, gpu: GpuContext, reference: Reference) -> ServedRun:
    """Deploy one scenario, run the prompts through the proxy, record, tear down."""
    plan = gpu.plan(request.param)
    settings = gpu.settings
    # Before the deployment: the reference runs on the same GPUs, which must be free.
    expected = reference.outputs(reference_launch(settings, plan.scenario.reference_tp), PROMPTS)
    with Deployment(plan, settings, gpu.log_dir) as dep:
        decode_before, prefill_before = dep.metrics("decode"), dep.metrics("prefill")
        answers = [dep.complete(prompt) for prompt in PROMPTS]  # one at a time: no batching
        decode_after, prefill_after = dep.metrics("decode"), dep.metrics("prefill")
        streamed = dep.complete(PROMPTS[0], stream=True)
        admin = dep.admin()
        check = asyncio.run(
            run_check(dep.proxy_url, model=dep.model, timeout=settings.request_timeout)
        )
        diagnostics = dep.diagnostics()
    return ServedRun(
        plan=plan,
        block_size=settings.block_size,
        min_match=settings.greedy_min_match,
        expected=expected,
        answers=answers,
        streamed=streamed,
        decode_kv=kv_evidence(decode_before, decode_after),
        prefill_kv=kv_evidence(prefill_before, prefill_after),
        prefill_rank_tokens=delta_by_label(
            parse_metrics(prefill_before), parse_metrics(prefill_after), PROMPT_TOKENS, "engine"
        ),
        admin=admin,
        check=check,
        diagnostics=diagnostics,
    )


def test_every_request_is_answered(served: ServedRun) -> None:
    """Each prompt through the proxy comes back 200 with text and usage (P then D worked)."""
    bad = [a.describe() for a in served.answers if a.kind != "ok" or a.prompt_tokens is None]
    assert not bad, f"{bad}\n{served.diagnostics}"


def test_the_proxy_registered_the_planned_shape(served: ServedRun) -> None:
    """Heartbeats carried the role, mode and DP/TP the scripts launched with."""
    scenario = served.plan.scenario
    assert served.admin["transfer_mode"] == scenario.mode
    by_address = {i["http_address"]: i for i in served.admin["instances"]}
    for launch, dp, tp in (
        (served.plan.prefills[0], scenario.prefill_dp, scenario.prefill_tp),
        (served.plan.decode, scenario.decode_dp, scenario.decode_tp),
    ):
        inst = by_address[launch.http_address]
        assert (inst["role"], inst["dp_size"], inst["tp_size"]) == (launch.role, dp, tp), inst
        assert inst["state"] == "healthy", inst


def test_kv_is_transferred_not_recomputed(served: ServedRun) -> None:
    """Decode took the prompts' KV from the connector; prefill computed them."""
    lengths = [a.prompt_tokens or 0 for a in served.answers]
    problems = kv_problems(served.decode_kv, served.prefill_kv, lengths, served.block_size)
    assert not problems, "\n".join(problems) + "\n" + served.diagnostics


def test_greedy_output_equals_a_non_disaggregated_instance(served: ServedRun) -> None:
    """The same greedy tokens as plain vLLM: the transferred KV is the right KV."""
    problem = greedy_problem(
        [r.text for r in served.expected], [a.text for a in served.answers], served.min_match
    )
    assert problem is None, problem


def test_streaming_gives_the_same_text(served: ServedRun) -> None:
    """SSE through the proxy ends with [DONE] and carries the non-streaming text."""
    streamed = served.streamed
    assert streamed.kind == "ok", (streamed.stream_errors, streamed.describe())
    assert streamed.text == served.answers[0].text


def test_check_command_passes(served: ServedRun) -> None:
    """``moriio-proxy check`` finds nothing to FAIL on a working deployment."""
    report = served.check
    assert report.exit_code == 0, report.to_text()
    assert report.by_name("completion").status == "OK", report.to_text()


@pytest.mark.parametrize("served", ["dp-prefill"], indirect=True)
def test_dp_prefill_uses_every_rank(served: ServedRun) -> None:
    """Every prefill DP rank computed prompts (X-data-parallel-rank reached each engine)."""
    ranks = served.plan.scenario.prefill_dp
    tokens = served.prefill_rank_tokens
    assert len(tokens) == ranks, f"engines seen in prefill's /metrics: {tokens}"
    assert all(v > 0 for v in tokens.values()), f"prompt tokens per DP rank: {tokens}"


# -- a prefill instance killed mid-run ----------------------------------------------------


class Load:
    """Requests sent back to back from a few threads, every outcome kept with its time."""

    def __init__(self, dep: Deployment, workers: int = 4) -> None:
        self.dep = dep
        self.workers = workers
        self.results: list[Completion] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            prompt = f"{PROMPTS[(worker + n) % len(PROMPTS)]} (worker {worker}, request {n})"
            result = self.dep.complete(prompt, max_tokens=16)
            with self._lock:
                self.results.append(result)
            n += 1

    def start(self) -> None:
        for worker in range(self.workers):
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Completion]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return list(self.results)


def test_prefill_killed_mid_run(gpu: GpuContext) -> None:
    """A crashed prefill costs at most clean errors; the other takes over; a restart rejoins.

    Under steady load one of two prefill instances is SIGKILLed (workers and heartbeat
    included). Every request must end as an answer or an error in vLLM's JSON shape (none
    hangs or is cut), requests after the proxy evicts the dead instance must all succeed on
    the other prefill, ``check`` must name the dead instance while it is still listed, and
    the restarted instance must register again and receive traffic.
    """
    plan = gpu.plan("prefill-failover")
    with Deployment(plan, gpu.settings, gpu.log_dir) as dep:
        victim = dep.processes["prefill"]
        address = victim.launch.http_address
        load = Load(dep)
        load.start()
        time.sleep(15)
        killed_at = time.time()
        victim.kill()
        report = asyncio.run(run_check(dep.proxy_url, model=dep.model, timeout=30))

        def evicted() -> bool:
            return address not in {i["http_address"] for i in dep.admin()["instances"]}

        wait_until(f"proxy evicts the killed prefill {address}", evicted, 60, interval=0.5)
        evicted_at = time.time()
        time.sleep(15)
        outcomes = load.stop()

        dep.restart("prefill")
        before = dep.metrics("prefill")
        after_restart = [
            dep.complete(f"{PROMPTS[i % len(PROMPTS)]} (after restart {i})", max_tokens=8)
            for i in range(12)
        ]
        restarted_tokens = delta(
            parse_metrics(before), parse_metrics(dep.metrics("prefill")), PROMPT_TOKENS
        )
        diagnostics = dep.diagnostics()

    unclean = [o.describe() for o in outcomes if o.kind == "unclean"]
    assert not unclean, f"{len(unclean)} unclean outcomes: {unclean[:5]}\n{diagnostics}"
    assert any(o.kind == "ok" and o.started + o.seconds < killed_at for o in outcomes)
    late = [o for o in outcomes if o.started > evicted_at + 1]
    assert late, "no request was sent after the eviction"
    failed_late = [o.describe() for o in late if o.kind != "ok"]
    assert not failed_late, f"after eviction, requests still failed: {failed_late[:5]}"
    listed = [r for r in report.results if r.name == f"reach P {address}"]
    if listed:  # still registered when check ran (within the instance TTL)
        assert listed[0].status == "FAIL", report.to_text()
    assert all(a.kind == "ok" for a in after_restart), [a.describe() for a in after_restart]
    assert restarted_tokens is None or restarted_tokens > 0, "the restarted prefill got no work"
