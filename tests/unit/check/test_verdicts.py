"""``check``'s verdicts from hand-made answers and instance views: no proxy, no sockets.

The integration tests show each verdict against a real deployment; these pin every branch,
including the ones a simulated deployment cannot produce (an unresolvable name, a proxy of
another version, a state this version does not know).
"""

from __future__ import annotations

import errno
import socket
import types
from typing import Any

import aiohttp
import pytest

from moriio_proxy.check import verdicts
from moriio_proxy.check.answers import (
    Answer,
    FailureKind,
    completion_text,
    model_ids,
    registration_rejections,
)
from moriio_proxy.check.probes import classify, instance_url
from moriio_proxy.check.report import CheckResult, Report
from moriio_proxy.metrics import Metrics
from moriio_proxy.protocol import error_body
from moriio_proxy.views import InstanceView
from tests.harness.entries import instance_view as view

URL = "http://10.0.0.1:10001"


def answer(status: int | None = 200, body: Any = None, **kwargs: Any) -> Answer:
    return Answer(URL + "/x", kwargs.pop("seconds", 0.012), status=status, body=body, **kwargs)


def failed(kind: FailureKind, error: str) -> Answer:
    return Answer(URL + "/x", 1.0, failure=kind, error=error)


def models_body(*ids: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}


def admin_body(*views: InstanceView, mode: str | None = "READ") -> dict[str, Any]:
    return {"transfer_mode": mode, "instances": [v.to_json() for v in views]}


def assert_ok(result: CheckResult) -> None:
    assert result.status == "OK", result
    assert result.hint == ""  # a next step only for what is not OK


# ------------------------------------------------------------------------- the proxy


@pytest.mark.parametrize(
    ("kind", "start", "hint"),
    [
        ("refused", "cannot reach", "start it (moriio-proxy serve"),
        ("dns", "cannot reach", "fix the host name in the URL"),
        ("timeout", "no answer from", "it accepted the connection but did not answer"),
        ("connect_timeout", "cannot reach", "check the host and port, and that a firewall"),
        ("unreachable", "cannot reach", "check the host and port, and that a firewall"),
    ],
)
def test_proxy_out_of_reach(kind: FailureKind, start: str, hint: str) -> None:
    result = verdicts.proxy(URL, failed(kind, "what aiohttp said"))
    assert result.status == "FAIL"
    assert result.message == f"{start} {URL}: what aiohttp said"
    assert result.hint.startswith(hint)


def test_proxy_answering_health_with_an_error_is_probably_not_the_proxy() -> None:
    result = verdicts.proxy(URL, answer(404, error_body("Not Found", 404)))
    assert result.status == "FAIL"
    assert result.message == f"{URL}/health answered HTTP 404: Not Found"
    assert "default 10001" in result.hint


def test_proxy_ok_with_its_latency() -> None:
    result = verdicts.proxy(URL, answer(200, {"status": "ok"}, seconds=0.0042))
    assert_ok(result)
    assert result.message == f"{URL} answers /health (4 ms)"


# ------------------------------------------------------------------- the instance list


def test_instances_listed_by_role_with_their_views_as_details() -> None:
    listed = (view("P"), view("D", 8200), view("D", 8201))
    result, listing = verdicts.instances(answer(200, admin_body(*listed)))
    assert_ok(result)
    assert result.message == "3 registered: 1 prefill, 2 decode"
    assert listing is not None and listing.instances == listed
    assert result.details["instances"] == [v.to_json() for v in listed]


def test_instances_not_served_means_not_the_proxy() -> None:
    result, listing = verdicts.instances(answer(404, {"detail": "Not Found"}))
    assert listing is None
    assert result.status == "FAIL"
    assert result.message == 'GET /admin/instances: HTTP 404: {"detail": "Not Found"}'
    assert "point check at the moriio-proxy itself" in result.hint


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("<html>hello</html>", "answer: expected a JSON object, got '<html>hello</html>'"),
        ({"instances": []}, "transfer_mode is missing"),
        (admin_body(view("P"), mode="BOTH"), "transfer_mode: expected one of"),
        ({"transfer_mode": "READ", "instances": [{"role": "P"}]}, "instances[0].http_address"),
        (
            {"transfer_mode": "READ", "instances": [{**view().to_json(), "dp_size": "2"}]},
            "instances[0].dp_size: expected an integer, got '2'",
        ),
    ],
)
def test_instances_malformed_answer_is_one_clear_fail(body: Any, error: str) -> None:
    result, listing = verdicts.instances(answer(200, body))
    assert listing is None  # the checks that need instances are skipped, nothing crashes
    assert result.status == "FAIL"
    assert result.message.startswith(
        "GET /admin/instances answered HTTP 200 with a malformed instance list: " + error
    )
    assert "the check of the proxy's own version" in result.hint


def test_no_instance_registered() -> None:
    result, listing = verdicts.instances(answer(200, admin_body(mode=None)))
    assert listing is None
    assert result.status == "FAIL" and result.message == "no instance registered"
    assert "after the proxy (the port trap)" in result.hint


def test_roles_missing_decode_and_a_prefill_that_went_quiet() -> None:
    prefill, decode = verdicts.roles([view("P", state="stale"), view("P", 8101)])
    assert_ok(prefill)
    assert prefill.message == "1 live: 10.0.0.2:8100, 10.0.0.2:8101"
    assert decode.status == "FAIL" and decode.message == "no decode instance registered"
    assert decode.hint.startswith("start decode with proxy_ip/proxy_ping_port")
    assert "deploy/scripts/decode.sh" in decode.hint


def test_roles_all_stale_is_no_live_instance() -> None:
    prefill, decode = verdicts.roles([view("P"), view("D", 8200, state="stale")])
    assert_ok(prefill)
    assert decode.status == "FAIL"
    assert decode.message == "no live decode instance: 10.0.0.2:8200 stopped sending heartbeats"


# ----------------------------------------------------------------------- transfer mode


def test_mode_disagreement_between_instances() -> None:
    listed = [view("P"), view("D", 8200, transfer_mode="WRITE")]
    result = verdicts.transfer_mode("READ", listed, {})
    assert result.status == "FAIL"
    assert result.message == "instances disagree on the transfer mode: READ, WRITE (in force: READ)"
    assert "read_mode" in result.hint


def test_mode_of_the_instances_other_than_the_one_in_force() -> None:
    listed = [view("P", transfer_mode="WRITE"), view("D", 8200, transfer_mode="WRITE")]
    result = verdicts.transfer_mode("READ", listed, {})
    assert result.status == "FAIL" and "(in force: READ)" in result.message


def test_mode_refused_registrations_warn() -> None:
    result = verdicts.transfer_mode("READ", [view("P")], {"mode_conflict": 2.0, "bad": 5.0})
    assert result.status == "WARN"
    assert result.message.startswith("READ in force, but 2 registration(s) were refused")
    assert "set it to READ like the others" in result.hint
    assert result.details == {"mode": "READ", "mode_conflicts": 2}


def test_mode_ok() -> None:
    result = verdicts.transfer_mode("WRITE", [view("P", transfer_mode="WRITE")], {"bad": 1.0})
    assert_ok(result)
    assert result.message == "WRITE on every instance" and result.details == {"mode": "WRITE"}


# ------------------------------------------------------------------------- parallelism


def test_dp_with_tp_collides() -> None:
    result = verdicts.parallelism([view("P", dp_size=2, tp_size=4), view("D", 8200, tp_size=4)])
    assert result.status == "FAIL"
    assert result.message.startswith("P 10.0.0.2:8100 has DP=2 with TP=4: vLLM 0.32")
    assert "DP>1 and TP=1, or TP>1 and DP=1" in result.hint


def test_tp_sizes_that_do_not_divide_fail_and_each_pair_is_named_once() -> None:
    listed = [view("P", tp_size=2), view("P", 8101, tp_size=2), view("D", 8200, tp_size=3)]
    result = verdicts.parallelism(listed)
    assert result.status == "FAIL"
    assert result.message == (
        "prefill TP=2 and decode TP=3 do not divide evenly: MoRI-IO maps TP ranks only "
        "when one size is a multiple of the other"
    )


def test_tp_sizes_that_divide_warn_about_kv_heads() -> None:
    result = verdicts.parallelism([view("P", tp_size=4), view("D", 8200, tp_size=2)])
    assert result.status == "WARN"
    assert result.message.startswith("heterogeneous TP (prefill 4, decode 2)")
    assert "KV heads" in result.message


def test_problems_outrank_warnings() -> None:
    listed = [view("P", tp_size=2), view("D", 8200, tp_size=4), view("D", 8201, tp_size=3)]
    result = verdicts.parallelism(listed)
    assert result.status == "FAIL"
    assert "TP=2 and decode TP=3 do not divide" in result.message
    assert "heterogeneous" not in result.message


def test_parallelism_ok_lists_the_shapes() -> None:
    result = verdicts.parallelism([view("P", dp_size=4), view("D", 8200, tp_size=1)])
    assert_ok(result)
    assert result.message == "P 10.0.0.2:8100 dp=4 tp=1, D 10.0.0.2:8200 dp=1 tp=1"


def test_an_unset_size_counts_as_one() -> None:
    assert_ok(verdicts.parallelism([view("P", tp_size=0), view("D", 8200, tp_size=1)]))


# ----------------------------------------------------------------------------- states


def test_states_name_each_instance_not_routed() -> None:
    listed = [
        view("P", state="ejected", consecutive_failures=3),
        view("D", 8200, state="stale", seconds_since_heartbeat=9.5),
        view("D", 8201, state="quarantined"),  # a newer proxy's state
        view("D", 8202),
        view("D", 8203, state="draining"),
    ]
    result = verdicts.states(listed)
    assert result.status == "WARN"
    assert result.message == (
        "P 10.0.0.2:8100 ejected after 3 consecutive failures; "
        "D 10.0.0.2:8200 stale: no heartbeat for 9.5s, about to be evicted; "
        "D 10.0.0.2:8201 in state 'quarantined'; "
        "draining (an operator's drain): D 10.0.0.2:8203"
    )
    assert "--eject-seconds" in result.hint


def test_a_drained_instance_is_shown_not_judged() -> None:
    result = verdicts.states([view("P"), view("D", 8200), view("D", 8201, state="draining")])
    assert_ok(result)
    assert result.message == "2 healthy; draining (an operator's drain): D 10.0.0.2:8201"


def test_a_role_whose_every_instance_drains_is_a_warning_not_a_failure() -> None:
    listed = [view("P"), view("D", 8200, state="draining"), view("D", 8201, state="draining")]
    prefill, decode = verdicts.roles(listed)
    assert_ok(prefill)
    assert decode.status == "WARN"
    assert decode.message == (
        "every live decode instance is draining: 10.0.0.2:8200, 10.0.0.2:8201; the proxy "
        "routes no new request"
    )
    assert "admin URL undrain D" in decode.hint
    # One instance still taking requests is enough.
    assert_ok(verdicts.roles([view("P"), view("D", 8200, state="draining"), view("D", 8201)])[1])


def test_states_ok() -> None:
    result = verdicts.states([view("P"), view("D", 8200)])
    assert_ok(result)
    assert result.message == "all 2 healthy"


# ------------------------------------------------------------------ each instance


BASE = "http://10.0.0.2:8100"


@pytest.mark.parametrize("kind", ["connect_timeout", "unreachable", "dns"])
def test_no_path_from_here_is_a_warning_only(kind: FailureKind) -> None:
    result = verdicts.reach(view(), BASE, failed(kind, "no route"), failed(kind, "no route"))
    assert result.name == "reach P 10.0.0.2:8100"
    assert result.status == "WARN"
    assert result.message.startswith("unreachable from this host (no route)")
    assert "run check on the proxy's host" in result.hint
    assert result.details == {"url": BASE, "failure": kind}


def test_refused_instance_fails() -> None:
    refused = failed("refused", "connection refused")
    result = verdicts.reach(view(), BASE, refused, refused)
    assert result.status == "FAIL"
    assert result.message.startswith(f"connection refused at {BASE}: the host answers")
    assert "--port equals http_port" in result.hint


@pytest.mark.parametrize("kind", ["timeout", "protocol"])
def test_instance_that_accepted_and_failed_is_hung(kind: FailureKind) -> None:
    result = verdicts.reach(view(), BASE, failed(kind, "no answer within 3s"), answer())
    assert result.status == "FAIL"
    assert result.message == (
        f"{BASE} accepted the connection but /health failed (no answer within 3s): the "
        "server is hung or overloaded"
    )


def test_instance_with_a_dead_engine() -> None:
    result = verdicts.reach(view(), BASE, answer(503, None), answer(503, None))
    assert result.status == "FAIL"
    assert result.message == "/health answered HTTP 503: the engine is dead or not loaded"
    assert result.details == {"url": BASE, "status": 503}


def test_instance_healthy_without_models_warns() -> None:
    result = verdicts.reach(view(), BASE, answer(), answer(500, error_body("boom", 500)))
    assert result.status == "WARN"
    assert result.message == "/health OK but /v1/models: HTTP 500: boom"


def test_instance_ok_with_its_models() -> None:
    result = verdicts.reach(view(), BASE, answer(seconds=0.002), answer(200, models_body("m")))
    assert_ok(result)
    assert result.message == "/health OK (2 ms), serves m"
    assert result.details == {"url": BASE, "models": ["m"]}


def test_unaddressable_instance() -> None:
    result = verdicts.unaddressable(view(http_address="nowhere"))
    assert result.status == "FAIL" and result.name == "reach P nowhere"
    assert result.message == "its http_address is not HOST:PORT"


def test_an_https_instance_is_probed_over_https() -> None:
    assert instance_url("10.0.0.2:8100", "https") == "https://10.0.0.2:8100"


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("10.0.0.2:8100", "http://10.0.0.2:8100"),
        ("::1:8100", "http://[::1]:8100"),
        ("nowhere", None),
        ("host/path:80", None),
        ("10.0.0.2:99999", None),
    ],
)
def test_instance_url(address: str, url: str | None) -> None:
    assert instance_url(address) == url


# ----------------------------------------------------------------------------- models


def test_models_the_proxy_cannot_list() -> None:
    result, model = verdicts.models(answer(503, error_body("no instance", 503)), [], "m")
    assert result.status == "FAIL"
    assert result.message == "GET /v1/models: HTTP 503: no instance"
    assert model == "m"  # an explicit --model is still tried


def test_models_that_differ_between_prefill_and_decode() -> None:
    own = [
        (view("P"), answer(200, models_body("a"))),
        (view("D", 8200), answer(200, models_body("b"))),
        (view("D", 8201), None),  # not asked (no address)
    ]
    result, model = verdicts.models(answer(200, models_body("a", "b")), own, None)
    assert result.status == "FAIL"
    assert result.message == "prefill serves a but decode serves b"
    assert model is None


def test_a_model_not_served_is_not_tested() -> None:
    result, model = verdicts.models(answer(200, models_body("a", "b")), [], "c")
    assert result.status == "FAIL"
    assert result.message == "model 'c' is not served; served: a, b"
    assert model is None


@pytest.mark.parametrize(("requested", "chosen"), [(None, "a"), ("b", "b")])
def test_the_model_tested(requested: str | None, chosen: str) -> None:
    own = [(view("P"), answer(200, models_body("a", "b"))), (view("D"), answer(200, {}))]
    result, model = verdicts.models(answer(200, models_body("a", "b")), own, requested)
    assert_ok(result)
    assert result.message == f"a, b (testing with {chosen})"
    assert model == chosen


# ------------------------------------------------------------------------- completion


def test_completion_not_attempted() -> None:
    result = verdicts.completion_not_attempted()
    assert result.status == "FAIL" and "--model NAME" in result.hint


def test_completion_that_timed_out_points_at_the_kv_transfer() -> None:
    result = verdicts.completion("m", failed("timeout", "no answer within 10s"))
    assert result.status == "FAIL"
    assert result.message == "POST /v1/completions: no answer within 10s"
    assert "--timeout 120" in result.hint and "MORI_DEVICE_NIC" in result.hint
    assert result.details == {"model": "m", "seconds": 1.0, "status": None, "request_id": None}


def test_completion_that_broke_points_at_the_proxy_log() -> None:
    result = verdicts.completion("m", failed("protocol", "ServerDisconnectedError: x"))
    assert result.status == "FAIL" and result.hint == "look at the proxy's log"


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (503, "no routable prefill or decode"),
        (502, "an instance failed the request"),
        (504, "an instance timed out"),
        (400, "the request was refused"),
        (429, "the proxy is at --max-inflight"),
        (500, "look at the proxy's and the instances' logs"),
    ],
)
def test_completion_error_status_has_its_next_step(status: int, hint: str) -> None:
    got = answer(status, error_body("why", status), headers={"x-request-id": "abc"})
    result = verdicts.completion("m", got)
    assert result.status == "FAIL"
    assert result.message == f"POST /v1/completions answered HTTP {status}: why (request id abc)"
    assert result.hint.startswith(hint)
    assert result.details["status"] == status and result.details["request_id"] == "abc"


def test_completion_without_text_warns() -> None:
    result = verdicts.completion("m", answer(200, {"choices": [{"text": ""}]}, seconds=0.25))
    assert result.status == "WARN"
    assert result.message == "answered in 250 ms but with no text"
    assert result.details["text"] == ""


def test_completion_ok_shows_the_text_shortened() -> None:
    text = " Paris,\nthe capital " + "x" * 80
    got = answer(200, {"choices": [{"text": text}]}, headers={"x-request-id": "r1"})
    result = verdicts.completion("m", got)
    assert_ok(result)
    shown = ("Paris, the capital " + "x" * 80)[:60] + "..."
    assert result.message == f"answered in 12 ms with text: {shown!r} (request id r1)"
    assert result.details["text"] == text


# ------------------------------------------------------------------------------ ready


def test_ready() -> None:
    result = verdicts.ready(answer(200, {"status": "ready", "transfer_mode": "WRITE"}))
    assert_ok(result)
    assert result.message == "/ready 200 (WRITE mode)"


def test_not_ready_because_draining() -> None:
    result = verdicts.ready(answer(503, {"status": "not ready", "reason": "draining"}))
    assert result.status == "FAIL"
    assert result.message == "/ready: HTTP 503: draining"
    assert "shutting down" in result.hint


def test_not_ready_because_an_operator_drained_every_decode() -> None:
    reason = "every decode instance is draining"
    result = verdicts.ready(answer(503, {"status": "not ready", "reason": reason}))
    assert result.status == "WARN"
    assert result.message == f"/ready: HTTP 503: {reason}"
    assert "moriio-proxy admin URL undrain" in result.hint


def test_not_ready_for_lack_of_instances() -> None:
    reason = "no decode instance registered"
    result = verdicts.ready(answer(503, {"status": "not ready", "reason": reason}))
    assert result.message == f"/ready: HTTP 503: {reason}"
    assert "/ready turns 200 once a prefill and a decode are registered" in result.hint


def test_ready_out_of_reach() -> None:
    result = verdicts.ready(failed("timeout", "no answer within 10s"))
    assert result.status == "FAIL" and result.message == "/ready: no answer within 10s"


# ---------------------------------------------------------------- reading the answers


def test_registration_rejections_from_the_proxys_own_metrics() -> None:
    metrics = Metrics()
    metrics.registrations_rejected.labels("mode_conflict").inc(2)
    metrics.registrations_rejected.labels("bad_msgpack").inc()
    metrics.rejected.labels("draining").inc(7)  # another counter with a reason label
    text = metrics.render()
    body = text.decode() if isinstance(text, bytes) else text
    assert registration_rejections(answer(200, body)) == {"mode_conflict": 2.0, "bad_msgpack": 1.0}


@pytest.mark.parametrize(
    "got",
    [
        answer(200, "<html>not metrics</html>"),
        answer(200, 'moriio_proxy_registrations_rejected_total{reason="x"} many'),
        answer(200, {"json": "instead"}),
        answer(404, 'moriio_proxy_registrations_rejected_total{reason="x"} 1'),
        failed("timeout", "no answer"),
    ],
)
def test_registration_rejections_absent_rather_than_a_crash(got: Answer) -> None:
    assert registration_rejections(got) == {}


def test_model_ids_only_from_a_model_list() -> None:
    body = {"data": [{"id": "a"}, {"id": 3}, "b", {"name": "c"}, {"id": "d"}]}
    assert model_ids(answer(200, body)) == ["a", "d"]
    assert model_ids(answer(500, body)) == []
    assert model_ids(answer(200, {"data": "a"})) == []
    assert model_ids(answer(200, "text")) == []


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"choices": [{"text": "hi"}, {"text": "no"}]}, "hi"),
        ({"choices": []}, ""),
        ({"choices": ["hi"]}, ""),
        ({"choices": [{"text": None}]}, ""),
        ("hi", ""),
    ],
)
def test_completion_text(body: Any, text: str) -> None:
    assert completion_text(answer(200, body)) == text


def test_describe_prefers_the_error_sentence_and_shortens_the_rest() -> None:
    assert answer(502, error_body("decode failed", 502)).describe() == "HTTP 502: decode failed"
    assert answer(502, None).describe() == "HTTP 502"
    long = answer(500, "  line one\n" + "y" * 300)
    assert long.describe() == "HTTP 500: line one " + "y" * 191 + "..."
    assert failed("dns", "cannot resolve host 'x'").describe() == "cannot resolve host 'x'"


# ---------------------------------------------------------------- failure classes


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    # aiohttp reads host, port and ssl of the connection key; its own key type changes
    # between versions.
    key = types.SimpleNamespace(host="h", port=1, ssl=True)
    return aiohttp.ClientConnectorError(key, os_error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "kind", "error"),
    [
        (aiohttp.ConnectionTimeoutError(), "connect_timeout", "connect timed out after 9s"),
        (TimeoutError(), "timeout", "no answer within 10s"),
        (
            _connector_error(socket.gaierror(-2, "Name or service not known")),
            "dns",
            "cannot resolve host 'h'",
        ),
        (
            _connector_error(OSError(errno.ECONNREFUSED, "Connection refused")),
            "refused",
            "connection refused",
        ),
        (
            _connector_error(OSError(errno.EHOSTUNREACH, "No route to host")),
            "unreachable",
            "no route to h (No route to host)",
        ),
        (
            _connector_error(OSError(errno.EACCES, "Permission denied")),
            "unreachable",
            "cannot connect: Permission denied",
        ),
        (aiohttp.ServerDisconnectedError(), "protocol", "ServerDisconnectedError: "),
    ],
)
def test_classify(exc: BaseException, kind: str, error: str) -> None:
    got_kind, got_error = classify(exc, 10.0)
    assert got_kind == kind
    assert got_error.startswith(error)


# ------------------------------------------------------------------------------ report


def test_report_text_and_exit_status() -> None:
    results = [
        verdicts.proxy(URL, answer(200, {})),
        CheckResult("states", "WARN", "two\nlines", "do x"),
        CheckResult("completion", "FAIL", "broke", "do y"),
    ]
    report = Report(URL, results, 1.26)
    assert report.status == "FAIL" and report.exit_code == 1
    lines = report.to_text().splitlines()
    assert lines[1] == "WARN  states      two lines -> next: do x"
    assert lines[2] == "FAIL  completion  broke -> next: do y"
    assert lines[3].startswith(f"summary: FAIL (1 OK, 1 WARN, 1 FAIL in 1.3s) for {URL}: fix")
    warned = Report(URL, results[:2], 0.5)
    assert warned.exit_code == 0 and warned.status == "WARN"
    assert warned.summary().endswith("nothing failed; look at states")
    with pytest.raises(KeyError):
        report.by_name("ready")


def test_an_aborted_report_is_one_line() -> None:
    down = verdicts.proxy(URL, failed("refused", "connection refused"))
    report = Report(URL, [down], 0.01, aborted=True)
    assert report.to_text() == (
        f"FAIL  proxy  cannot reach {URL}: connection refused -> next: start it "
        "(moriio-proxy serve, or deploy/scripts/proxy.sh), or fix the port in the URL"
    )
    assert report.to_json()["checks"][0]["hint"].startswith("start it")
