"""``moriio-proxy check``: the verdicts a person gets for each way a deployment goes wrong.

Each case builds the deployment in-process (the proxy plus simulated vLLM instances on real
loopback sockets) and runs the check function against it, as the CLI would; two cases run
the real command in a subprocess for its exit status and output shape.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from moriio_proxy.check import Report, normalize_url, run_check
from moriio_proxy.cli import main as cli_main
from moriio_proxy.protocol import Instance
from moriio_proxy.sim import SimFaults
from tests.harness import RunningProxy, running_proxy
from tests.harness.apps import serving
from tests.harness.contract import INSTANCE_KEYS
from tests.harness.ports import unconnectable_port
from tests.harness.waiting import PROMPTLY, STATE_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def statuses(report: Report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


async def one_p_one_d(proxy: RunningProxy, **kwargs: object) -> None:
    await proxy.add_sim("P", **kwargs)
    await proxy.add_sim("D", **kwargs)
    await proxy.wait_registered(1, 1)


async def run_cli(*args: str, timeout: float = STATE_TIMEOUT) -> tuple[int, str, str]:
    """The real command in a subprocess, without blocking the loop the proxy runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "moriio_proxy",
        "check",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- a healthy deployment -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_healthy_1p1d_is_all_ok_and_exit_0(mode: str) -> None:
    async with running_proxy() as proxy:
        await one_p_one_d(proxy, mode=mode)
        report = await run_check(proxy.url, timeout=5)
    assert report.exit_code == 0, report.to_text()
    assert set(statuses(report).values()) == {"OK"}, report.to_text()
    names = [r.name for r in report.results]
    assert names[:7] == [
        "proxy",
        "instances",
        "prefill",
        "decode",
        "transfer-mode",
        "parallelism",
        "states",
    ]
    assert names[-3:] == ["models", "completion", "ready"]
    assert sum(name.startswith("reach ") for name in names) == 2
    completion = report.by_name("completion")
    assert completion.details["model"] == "sim-model"  # the first listed, no --model needed
    assert completion.details["text"]
    assert completion.details["seconds"] < 5
    assert completion.details["request_id"]
    assert f"{mode} on every instance" in report.by_name("transfer-mode").message
    lines = report.to_text().splitlines()
    assert len(lines) == len(report.results) + 1
    assert all(line.startswith("OK ") for line in lines[:-1])
    assert lines[-1].startswith("summary: OK ")


async def test_a_drained_instance_is_shown_and_a_fully_drained_role_is_a_warning() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P")
        drained = await proxy.add_sim("D")
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 2)
        entry = proxy.state.registry.get(("D", drained.http_address))
        assert entry is not None
        entry.draining = True
        report = await run_check(proxy.url, timeout=5)
        assert report.exit_code == 0, report.to_text()
        assert report.by_name("states").message == (
            f"2 healthy; draining (an operator's drain): D {drained.http_address}"
        )
        for other in proxy.state.registry.healthy("D"):
            other.draining = True  # every decode: nothing new can be routed
        report = await run_check(proxy.url, timeout=5)
    found = statuses(report)
    assert (found["decode"], found["states"], found["ready"]) == ("WARN", "OK", "WARN")
    assert found["completion"] == "FAIL"  # the proxy answers 503: it cannot serve


async def test_admin_instances_serves_the_keys_it_always_has() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", dp_size=2)
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        async with (
            aiohttp.ClientSession() as session,
            session.get(proxy.url + "/admin/instances") as resp,
        ):
            doc = await resp.json()
    assert list(doc) == ["transfer_mode", "instances"]
    assert doc["transfer_mode"] == "READ"
    prefill = next(i for i in doc["instances"] if i["role"] == "P")
    assert list(prefill) == INSTANCE_KEYS
    assert prefill["dp_size"] == 2 and prefill["inflight_by_dp_rank"] == [0, 0]
    assert prefill["static"] is False and prefill["state"] == "healthy"
    assert isinstance(prefill["seconds_since_heartbeat"], float)


async def test_model_is_used_when_given_and_refused_when_not_served() -> None:
    async with running_proxy() as proxy:
        await one_p_one_d(proxy, model="org/model-a")
        good = await run_check(proxy.url, model="org/model-a", timeout=5)
        bad = await run_check(proxy.url, model="org/other", timeout=5)
    assert good.exit_code == 0, good.to_text()
    assert good.by_name("completion").details["model"] == "org/model-a"
    assert bad.exit_code == 1
    models = bad.by_name("models")
    assert models.status == "FAIL"
    assert "'org/other' is not served; served: org/model-a" in models.message
    assert "--model" in models.hint
    assert bad.by_name("completion").status == "FAIL"


async def test_url_forms_people_type_are_accepted() -> None:
    async with running_proxy() as proxy:
        await one_p_one_d(proxy)
        hostport = proxy.url.removeprefix("http://")
        report = await run_check(hostport + "/v1/", timeout=5)
    assert report.url == proxy.url
    assert report.exit_code == 0, report.to_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:10001", "http://10.0.0.1:10001"),
        ("http://proxy:10001/", "http://proxy:10001"),
        ("https://proxy.example/v1", "https://proxy.example"),
        ("http://[::1]:10001", "http://[::1]:10001"),
    ],
)
def test_normalize_url(text: str, expected: str) -> None:
    assert normalize_url(text) == expected


@pytest.mark.parametrize("text", ["", "ftp://proxy", "http://:10001", "http://proxy:99999"])
def test_normalize_url_refuses_what_cannot_be_a_proxy(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(text)


# -- what is missing ----------------------------------------------------------------------


async def test_no_decode_fails_with_the_registration_hint() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P")
        await proxy.wait_registered(1, 0)
        report = await run_check(proxy.url, timeout=5)
    assert report.exit_code == 1
    decode = report.by_name("decode")
    assert decode.status == "FAIL"
    assert decode.message == "no decode instance registered"
    assert "start decode with proxy_ip/proxy_ping_port pointing at this proxy" in decode.hint
    assert "deploy/README.md" in decode.hint
    assert report.by_name("prefill").status == "OK"
    assert report.by_name("ready").status == "FAIL"
    completion = report.by_name("completion")
    assert completion.status == "FAIL" and completion.details["status"] == 503
    assert "prefill/decode lines" in completion.hint
    text = report.to_text()
    assert "FAIL  decode" in text
    assert "-> next: start decode with proxy_ip/proxy_ping_port" in text
    assert text.splitlines()[-1].startswith("summary: FAIL ")


async def test_nothing_registered_fails_once_and_skips_what_depends_on_instances() -> None:
    async with running_proxy() as proxy:
        report = await run_check(proxy.url, timeout=5)
    assert report.exit_code == 1
    got = statuses(report)
    assert got["instances"] == "FAIL"
    assert "proxy_ip/proxy_ping_port" in report.by_name("instances").hint
    # Nothing registered: no per-instance lines, no mode or parallelism verdicts.
    assert not {"prefill", "decode", "transfer-mode", "parallelism", "states"} & set(got)
    assert got["models"] == "FAIL" and got["completion"] == "FAIL" and got["ready"] == "FAIL"


async def test_unreachable_proxy_is_one_fail_line_and_exit_1(dead_port: int) -> None:
    url = f"http://127.0.0.1:{dead_port}"
    started = time.monotonic()
    report = await run_check(url, timeout=60)
    assert time.monotonic() - started < PROMPTLY  # refused at once: no waiting for the timeout
    assert report.exit_code == 1 and report.aborted
    lines = report.to_text().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("FAIL  proxy  cannot reach " + url)
    assert "connection refused" in lines[0]
    assert "-> next: start it (moriio-proxy serve" in lines[0]


async def test_a_malformed_instance_list_is_one_clear_fail_not_a_crash() -> None:
    """A proxy of another version (or something else on its port) answering oddly."""
    entry = {"role": "P", "transfer_mode": "READ"}  # no http_address, among others
    answers: dict[str, tuple[int, object]] = {
        "/health": (200, {"status": "ok"}),
        "/admin/instances": (200, {"transfer_mode": "READ", "instances": [entry]}),
        "/metrics": (200, "<html>no metrics</html>"),
        "/v1/models": (503, {"error": {"message": "none here"}}),
        "/ready": (503, {"reason": "not today"}),
    }

    async def handle(request: web.Request) -> web.Response:
        status, body = answers[request.path]
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)

    app = web.Application()
    for path in answers:
        app.router.add_get(path, handle)
    async with serving(app) as url:
        report = await run_check(url, timeout=5)
    assert report.exit_code == 1
    instances = report.by_name("instances")
    assert instances.status == "FAIL"
    assert "malformed instance list: instances[0].http_address is missing" in instances.message
    assert "point check at the moriio-proxy itself" in instances.hint
    got = statuses(report)
    assert not {"prefill", "decode", "transfer-mode", "parallelism", "states"} & set(got)
    assert got["models"] == got["completion"] == got["ready"] == "FAIL"
    assert report.by_name("ready").message == "/ready: HTTP 503: not today"
    assert report.to_text().splitlines()[-1].startswith("summary: FAIL ")


# -- inconsistent deployments -------------------------------------------------------------


async def test_dp_with_tp_on_one_instance_fails() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", dp_size=2, tp_size=2)
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        report = await run_check(proxy.url, timeout=5)
    assert report.exit_code == 1
    parallelism = report.by_name("parallelism")
    assert parallelism.status == "FAIL"
    assert "DP=2 with TP=2" in parallelism.message
    assert "colliding MoRI-IO ports" in parallelism.message
    assert "DP>1 and TP=1, or TP>1 and DP=1" in parallelism.hint


async def test_tp_sizes_that_do_not_divide_fail() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P", tp_size=2)
        await proxy.add_sim("D", tp_size=3)
        await proxy.wait_registered(1, 1)
        report = await run_check(proxy.url, timeout=5)
    parallelism = report.by_name("parallelism")
    assert parallelism.status == "FAIL"
    assert "prefill TP=2 and decode TP=3 do not divide evenly" in parallelism.message
    assert report.exit_code == 1


async def test_heterogeneous_tp_that_divides_is_a_warning_only() -> None:
    # WRITE mode with vLLM 0.33 on both: the one combination the proxy pairs (in READ it
    # does not: tests/integration/test_versions.py).
    async with running_proxy() as proxy:
        await proxy.add_sim("P", tp_size=2, mode="WRITE", vllm_version="0.33")
        await proxy.add_sim("D", tp_size=4, mode="WRITE", vllm_version="0.33")
        await proxy.wait_registered(1, 1)
        report = await run_check(proxy.url, timeout=5)
    assert report.by_name("parallelism").status == "WARN"
    assert "KV heads" in report.by_name("parallelism").message
    assert report.exit_code == 0, report.to_text()  # warnings allowed
    assert report.to_text().splitlines()[-1].startswith("summary: OK with warnings")


async def test_refused_registration_in_the_other_mode_is_reported() -> None:
    async with running_proxy(transfer_mode="READ") as proxy:
        await proxy.add_sim("P", mode="READ")
        await proxy.add_sim("D", mode="WRITE")  # refused by the proxy: never registered
        await proxy.wait_registered(1, 0)
        metrics = proxy.state.metrics.registry
        await proxy.wait_for(
            lambda: bool(
                metrics.get_sample_value(
                    "moriio_proxy_registrations_rejected_total", {"reason": "mode_conflict"}
                )
            )
        )
        report = await run_check(proxy.url, timeout=5)
    mode = report.by_name("transfer-mode")
    assert mode.status == "WARN"
    assert "refused for the other mode" in mode.message
    assert "read_mode" in mode.hint
    assert report.by_name("decode").status == "FAIL"


async def test_ejected_instance_is_a_warning() -> None:
    async with running_proxy(eject_after=1, eject_seconds=60) as proxy:
        await one_p_one_d(proxy)
        registry = proxy.state.registry
        (prefill,) = registry.healthy("P")
        registry.report_failure(prefill)
        report = await run_check(proxy.url, timeout=5)
    states = report.by_name("states")
    assert states.status == "WARN"
    assert "ejected after 1 consecutive failures" in states.message
    # The only prefill is still tried (all of a role ejected): serving works, exit 0.
    assert report.by_name("completion").status == "OK"
    assert report.exit_code == 0


# -- instances seen directly --------------------------------------------------------------


def static(role: str, port: int) -> Instance:
    return Instance(role, f"127.0.0.1:{port}", "127.0.0.1", 6301, 61005, 1, 1, "READ")  # type: ignore[arg-type]


async def test_refused_instance_fails_and_unreachable_one_warns_distinctly(
    dead_port: int,
) -> None:
    with unconnectable_port() as far_port:
        dead, far = static("D", dead_port), static("P", far_port)
        async with running_proxy(
            static_instances=[dead, far], connect_timeout=0.3, max_retries=4
        ) as proxy:
            await proxy.add_sim("P")
            await proxy.add_sim("D")
            await proxy.wait_registered(2, 2)
            # 3 s: the far instance's connect times out after 2.7; the completion through
            # the proxy has as long to retry past both, which a busy machine may need.
            report = await run_check(proxy.url, timeout=3)
    refused = report.by_name(f"reach D {dead.http_address}")
    assert refused.status == "FAIL"
    assert "connection refused" in refused.message and "nothing listens" in refused.message
    unreachable = report.by_name(f"reach P {far.http_address}")
    assert unreachable.status == "WARN", unreachable
    assert "unreachable from this host (connect timed out" in unreachable.message
    assert "proxy may still reach it" in unreachable.message
    assert "run check on the proxy's host" in unreachable.hint
    assert report.by_name("completion").status == "OK"  # retried past both
    assert report.exit_code == 1


async def test_instance_that_accepts_but_never_answers_fails() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel accepts; nobody ever reads or answers
    try:
        hung = static("P", server.getsockname()[1])
        async with running_proxy(static_instances=[hung], prefill_timeout=0.5) as proxy:
            await proxy.add_sim("P")
            await proxy.add_sim("D")
            await proxy.wait_registered(2, 1)
            # 3 s, not less: the proxy's own probes share the bound on a busy machine.
            report = await run_check(proxy.url, timeout=3)
    finally:
        server.close()
    reach = report.by_name(f"reach P {hung.http_address}")
    assert reach.status == "FAIL"
    assert "accepted the connection but /health failed (no answer within 3s)" in reach.message


async def test_instance_with_dead_engine_fails() -> None:
    async with running_proxy() as proxy:
        await one_p_one_d(proxy)
        decode = proxy.sims[1]
        decode.dead_reason = "EngineCore died"  # /health turns 503 as in vLLM
        report = await run_check(proxy.url, timeout=5)
    reach = report.by_name(f"reach D {decode.http_address}")
    assert reach.status == "FAIL"
    assert "HTTP 503" in reach.message and "engine is dead" in reach.message


# -- the completion -----------------------------------------------------------------------


async def test_failing_decode_fails_the_completion_with_its_status() -> None:
    async with running_proxy(max_retries=0) as proxy:
        await proxy.add_sim("P")
        await proxy.add_sim("D", faults=SimFaults(status=500))
        await proxy.wait_registered(1, 1)
        report = await run_check(proxy.url, timeout=5)
    completion = report.by_name("completion")
    assert completion.status == "FAIL"
    assert completion.details["status"] == 502
    assert "answered HTTP 502" in completion.message
    assert "request id" in completion.message
    assert "proxy's log" in completion.hint
    assert report.exit_code == 1


async def test_a_hanging_completion_is_bounded_by_the_timeout() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P")
        await proxy.add_sim("D", faults=SimFaults(stall_first_byte=float("inf")))
        await proxy.wait_registered(1, 1)
        started = time.monotonic()
        report = await run_check(proxy.url, timeout=3)  # the proxy's probes share it
        elapsed = time.monotonic() - started
    assert elapsed < 3 + PROMPTLY  # the stall never ends
    completion = report.by_name("completion")
    assert completion.status == "FAIL"
    assert "no answer within 3s" in completion.message
    assert "--timeout" in completion.hint


# -- machine output and the real command --------------------------------------------------


async def test_json_report_round_trips() -> None:
    async with running_proxy() as proxy:
        await proxy.add_sim("P")
        await proxy.wait_registered(1, 0)
        report = await run_check(proxy.url, timeout=5)
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["status"] == "FAIL" and doc["exit_code"] == 1
    assert doc["url"] == proxy.url
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["decode"]["status"] == "FAIL"
    assert by_name["decode"]["hint"].startswith("start decode with proxy_ip")
    assert by_name["prefill"]["hint"] is None
    assert doc["summary"].startswith("summary: FAIL")


async def test_cli_json_and_exit_status_against_a_healthy_proxy() -> None:
    async with running_proxy() as proxy:
        await one_p_one_d(proxy)
        code, out, err = await run_cli(proxy.url, "--json", "--timeout", "5")
    assert code == 0, (out, err)
    doc = json.loads(out)
    assert doc["status"] == "OK"
    assert {c["name"]: c["status"] for c in doc["checks"]}["completion"] == "OK"


async def test_cli_unreachable_proxy_prints_one_line_and_exits_1(dead_port: int) -> None:
    code, out, err = await run_cli(f"127.0.0.1:{dead_port}", "--timeout", "2")
    assert code == 1
    assert len(out.splitlines()) == 1 and out.startswith("FAIL  proxy  cannot reach")
    assert err == ""


@pytest.mark.parametrize(
    "args",
    [
        ["ftp://proxy"],
        ["http://proxy:1", "--timeout", "0"],
        ["http://proxy:1", "--max-tokens", "x"],
    ],
)
def test_bad_usage_exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli_main(["check", *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error:" in captured.err
