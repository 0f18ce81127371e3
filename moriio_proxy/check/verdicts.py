"""The verdicts: pure functions from what the probes saw to OK/WARN/FAIL with a next step.

A P/D deployment fails in ways that look alike from a client (a 503, a hang, a 502), but
each has a different fix. Each function here knows one of those ways; none does I/O, so each
is tested with hand-made answers and instance views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..protocol import Role, TransferMode
from ..versions import SUPPORTED, parse_release
from ..views import AdminInstances, InstanceView, ViewError
from .answers import NO_PATH, Answer, completion_text, model_ids, ms, said
from .report import CheckResult, fail, ok, warn

DOCS = "see deploy/README.md"

_REGISTER_HINT = (
    "start {role} with proxy_ip/proxy_ping_port pointing at this proxy "
    "(deploy/scripts/{script}.sh sets both; with --discovery kubernetes the {role} pods must "
    "be Ready and match the proxy's selector); {docs}"
)
_ROLES: tuple[tuple[Role, str], ...] = (("P", "prefill"), ("D", "decode"))


def label(view: InstanceView) -> str:
    return f"{view.role} {view.http_address}"


# ------------------------------------------------------------------------- the proxy


def proxy(url: str, health: Answer) -> CheckResult:
    """Is the proxy there at all; anything but OK ends the run."""
    if health.failure is not None:
        hint = {
            "refused": "start it (moriio-proxy serve, or deploy/scripts/proxy.sh), or "
            "fix the port in the URL",
            "dns": "fix the host name in the URL",
            "timeout": "it accepted the connection but did not answer: look at its log, "
            "or restart it",
        }.get(
            health.failure,
            "check the host and port, and that a firewall lets this host reach the "
            "proxy's HTTP port",
        )
        what = "no answer from" if health.failure == "timeout" else "cannot reach"
        return fail("proxy", f"{what} {url}: {health.error}", hint)
    if not health.ok:
        return fail(
            "proxy",
            f"{url}/health answered {health.describe()}",
            "is this the proxy's HTTP port (default 10001)? " + DOCS,
        )
    return ok("proxy", f"{url} answers /health ({ms(health.seconds)})")


# ------------------------------------------------------ what the proxy has registered


def instances(admin: Answer) -> tuple[CheckResult, AdminInstances | None]:
    """The registered instances; None (the checks that need them are skipped) unless OK."""
    not_the_proxy = (
        "point check at the moriio-proxy itself (not at a vLLM instance), at the "
        "same port clients use"
    )
    if not admin.ok:
        return fail("instances", f"GET /admin/instances: {admin.describe()}", not_the_proxy), None
    try:
        listing = AdminInstances.from_json(admin.body)
    except ViewError as exc:
        return fail(
            "instances",
            f"GET /admin/instances answered HTTP 200 with a malformed instance list: {exc}",
            f"{not_the_proxy}; if it is, run the check of the proxy's own version",
        ), None
    if not listing.instances:
        return fail(
            "instances",
            "no instance registered",
            "start the prefill and decode instances with proxy_ip/proxy_ping_port "
            "pointing at this proxy, after the proxy (the port trap); " + DOCS,
        ), None
    n_p = sum(v.role == "P" for v in listing.instances)
    n_d = sum(v.role == "D" for v in listing.instances)
    return ok(
        "instances",
        f"{len(listing.instances)} registered: {n_p} prefill, {n_d} decode",
        {"instances": [v.to_json() for v in listing.instances]},
    ), listing


def roles(listed: Sequence[InstanceView]) -> list[CheckResult]:
    """One verdict per role: at least one instance that still sends heartbeats."""
    results = []
    for role, name in _ROLES:
        mine = [v for v in listed if v.role == role]
        live = [v for v in mine if v.state != "stale"]
        addresses = ", ".join(v.http_address for v in mine)
        if not mine:
            results.append(
                fail(
                    name,
                    f"no {name} instance registered",
                    _REGISTER_HINT.format(role=name, script=name, docs=DOCS),
                )
            )
        elif not live:
            results.append(
                fail(
                    name,
                    f"no live {name} instance: {addresses} stopped sending heartbeats",
                    f"restart the {name} instance(s) and look at their logs; a heartbeat "
                    "stops when the vLLM worker exits",
                )
            )
        elif all(v.state == "draining" for v in live):
            results.append(
                warn(
                    name,
                    f"every live {name} instance is draining: {addresses}; the proxy routes "
                    "no new request",
                    f"undrain one (moriio-proxy admin URL undrain {role} HOST:PORT) or start "
                    f"another {name} instance",
                )
            )
        else:
            results.append(ok(name, f"{len(live)} live: {addresses}"))
    return results


def transfer_mode(
    in_force: TransferMode | None,
    listed: Sequence[InstanceView],
    rejections: dict[str, float],
) -> CheckResult:
    """One READ/WRITE mode everywhere; ``rejections`` are the proxy's refused registrations."""
    modes = sorted({v.transfer_mode for v in listed})
    conflicts = int(rejections.get("mode_conflict", 0))
    if len(modes) > 1 or (in_force and modes and modes != [in_force]):
        return fail(
            "transfer-mode",
            f"instances disagree on the transfer mode: {', '.join(modes)} (in force: {in_force})",
            'give every P and D the same read_mode ("true" for READ, omitted for '
            "WRITE; TRANSFER_MODE in the deploy env file) and restart the odd ones",
        )
    if conflicts:
        return warn(
            "transfer-mode",
            f"{in_force} in force, but {conflicts} registration(s) were refused for "
            "the other mode (moriio_proxy_registrations_rejected_total"
            '{reason="mode_conflict"})',
            f"an instance runs with the other read_mode and is not routed: set it to "
            f"{in_force} like the others and restart it (the proxy log names it)",
            {"mode": in_force, "mode_conflicts": conflicts},
        )
    return ok("transfer-mode", f"{in_force} on every instance", {"mode": in_force})


def parallelism(listed: Sequence[InstanceView]) -> CheckResult:
    """DP and TP sizes the MoRI-IO connector (0.32 and 0.33) can serve together."""
    problems: list[str] = []
    warnings: list[str] = []
    for view in listed:
        dp, tp = _size(view.dp_size), _size(view.tp_size)
        if dp > 1 and tp > 1:
            problems.append(
                f"{label(view)} has DP={dp} with TP={tp}: vLLM 0.32 (and 0.33) gives its "
                "workers colliding MoRI-IO ports (base + dp_rank + tp_rank)"
            )
    prefill_tp = {_size(v.tp_size) for v in listed if v.role == "P"}
    decode_tp = {_size(v.tp_size) for v in listed if v.role == "D"}
    for p_tp, d_tp in sorted((p, d) for p in prefill_tp for d in decode_tp):
        if p_tp == d_tp:
            continue
        if max(p_tp, d_tp) % min(p_tp, d_tp):
            problems.append(
                f"prefill TP={p_tp} and decode TP={d_tp} do not divide evenly: "
                "MoRI-IO maps TP ranks only when one size is a multiple of the other"
            )
        else:
            warnings.append(
                f"heterogeneous TP (prefill {p_tp}, decode {d_tp}): the proxy pairs them "
                "only in WRITE mode with vLLM 0.33 or later on both sides, and vLLM then "
                "needs each TP size to shard the model's KV heads evenly (MLA models "
                "excepted)"
            )
    if problems:
        return fail(
            "parallelism",
            "; ".join(problems),
            "relaunch with DP>1 and TP=1, or TP>1 and DP=1, and TP sizes where one "
            "divides the other (the deploy scripts refuse DP>1 with TP>1); " + DOCS,
        )
    if warnings:
        return warn(
            "parallelism",
            "; ".join(warnings),
            "keep prefill and decode TP equal unless the model meets that rule",
        )
    shapes = ", ".join(f"{label(v)} dp={v.dp_size} tp={v.tp_size}" for v in listed)
    return ok("parallelism", shapes)


def pairing(listed: Sequence[InstanceView]) -> CheckResult:
    """The vLLM version of each instance, and the instances the proxy pairs with nobody.

    The proxy never forms a pair the engines cannot serve (TP sizes, versions: see
    docs/protocol.md §8.2 and §10), so such an instance is registered, healthy and unused.
    """
    live = [v for v in listed if v.state != "stale"]
    details: dict[str, Any] = {"versions": {label(v): v.vllm_version for v in listed}}
    unpaired = [v for v in live if v.unpaired]
    if unpaired:
        named = "; ".join(f"{label(v)}: {v.unpaired}" for v in unpaired)
        hint = (
            "give prefill and decode the same TP size, or run vLLM 0.33 or later on both "
            "in WRITE mode; never a 0.33 prefill with an older decode in WRITE mode; see "
            "docs/protocol.md section 10"
        )
        blocked = [
            name
            for role, name in _ROLES
            if (mine := [v for v in live if v.role == role]) and all(v.unpaired for v in mine)
        ]
        if blocked:
            return fail("pairing", f"no {' or '.join(blocked)} can be used: {named}", hint, details)
        return warn("pairing", f"not used: {named}", hint, details)
    odd = [v for v in live if v.vllm_version and _release_name(v.vllm_version) not in SUPPORTED]
    if odd:
        return warn(
            "pairing",
            "not a supported vLLM release: "
            + ", ".join(f"{label(v)} runs {v.vllm_version}" for v in odd),
            f"run vLLM {' or '.join(SUPPORTED)}; the proxy applies the rules of the nearest",
            details,
        )
    unknown = [v for v in live if v.vllm_version is None]
    if unknown and len(unknown) < len(live):
        return warn(
            "pairing",
            "vLLM version unknown for "
            + ", ".join(label(v) for v in unknown)
            + ": the proxy treats them as 0.32 until their GET /version answers",
            "check that the proxy reaches those instances' HTTP port (see the reach lines)",
            details,
        )
    if unknown:
        return ok("pairing", "every instance can be paired; no vLLM version reported", details)
    versions = sorted({v.vllm_version for v in live if v.vllm_version})
    return ok("pairing", f"every instance can be paired; vLLM {', '.join(versions)}", details)


def _release_name(version: str) -> str | None:
    release = parse_release(version)
    return None if release is None else f"{release[0]}.{release[1]}"


def _size(n: int) -> int:
    """A size as vLLM reads it: 0 (unset) is 1."""
    return n or 1


def states(listed: Sequence[InstanceView]) -> CheckResult:
    """Instances the proxy lists but does not route to (ejected, about to be evicted).

    A draining instance is not routed to either, but by an operator's choice (admin API):
    it is named, not judged.
    """
    bad: list[str] = []
    drained = [label(v) for v in listed if v.state == "draining"]
    for view in listed:
        if view.state == "draining":
            continue
        if view.state == "ejected":
            bad.append(
                f"{label(view)} ejected after {view.consecutive_failures} consecutive failures"
            )
        elif view.state == "stale":
            bad.append(
                f"{label(view)} stale: no heartbeat for "
                f"{view.seconds_since_heartbeat}s, about to be evicted"
            )
        elif view.state != "healthy":
            bad.append(f"{label(view)} in state {view.state!r}")
    draining = f"draining (an operator's drain): {', '.join(drained)}" if drained else ""
    if bad:
        return warn(
            "states",
            "; ".join(bad + ([draining] if draining else [])),
            "look at those instances' logs and at moriio_proxy_upstream_errors_total; an "
            "ejected instance rests --eject-seconds, then gets one more try",
        )
    if drained:
        return ok("states", f"{len(listed) - len(drained)} healthy; {draining}")
    return ok("states", f"all {len(listed)} healthy")


# ---------------------------------------------------------- each instance, directly


def unaddressable(view: InstanceView) -> CheckResult:
    """An instance whose http_address cannot be probed at all."""
    return fail(
        f"reach {label(view)}",
        "its http_address is not HOST:PORT",
        "fix http_port/host_ip of that instance",
    )


def reach(view: InstanceView, base: str, health: Answer, models: Answer) -> CheckResult:
    """The instance's own /health and /v1/models, asked from here as the proxy would."""
    name = f"reach {label(view)}"
    if health.failure in NO_PATH:
        return warn(
            name,
            f"unreachable from this host ({health.error}); the proxy may still reach it "
            "over its own network",
            "run check on the proxy's host to test the path the proxy uses; the "
            "completion line tells whether the proxy gets through",
            {"url": base, "failure": health.failure},
        )
    if health.failure == "refused":
        return fail(
            name,
            f"connection refused at {base}: the host answers but nothing listens on "
            "that port (vLLM's server is down or restarting, or a firewall rejects)",
            "look at that instance's log and restart it; check that --port equals http_port",
            {"url": base, "failure": "refused"},
        )
    if health.failure is not None:
        return fail(
            name,
            f"{base} accepted the connection but /health failed ({health.error}): the "
            "server is hung or overloaded",
            "look at that instance's log; restart it if it stays hung",
            {"url": base, "failure": health.failure},
        )
    if not health.ok:
        return fail(
            name,
            f"/health answered {health.describe()}: the engine is dead or not loaded",
            "look at that instance's log (an EngineCore fatal error kills the engine); restart it",
            {"url": base, "status": health.status},
        )
    served = model_ids(models)
    if not served:
        return warn(
            name,
            f"/health OK but /v1/models: {models.describe() or 'empty'}",
            "look at that instance's log",
            {"url": base},
        )
    return ok(
        name,
        f"/health OK ({ms(health.seconds)}), serves {', '.join(served)}",
        {"url": base, "models": served},
    )


# ----------------------------------------------------------- models, completion, /ready


def models(
    answer: Answer,
    instance_models: Sequence[tuple[InstanceView, Answer | None]],
    requested: str | None,
) -> tuple[CheckResult, str | None]:
    """The proxy's model list against each instance's; returns the model to test with.

    ``instance_models`` pairs each listed instance with its own /v1/models answer (None
    when it was not asked). With no model to test, the completion is not attempted.
    """
    served = model_ids(answer)
    if not served:
        return fail(
            "models",
            f"GET /v1/models: {answer.describe() or 'no model listed'}",
            "the proxy lists the models of its live instances: get a prefill and a "
            "decode registered and answering (see the lines above)",
        ), requested
    by_role: dict[Role, set[str]] = {"P": set(), "D": set()}
    for view, own in instance_models:
        if own is not None:
            by_role[view.role].update(model_ids(own))
    if by_role["P"] and by_role["D"] and not by_role["P"] & by_role["D"]:
        return fail(
            "models",
            f"prefill serves {', '.join(sorted(by_role['P']))} but decode serves "
            f"{', '.join(sorted(by_role['D']))}",
            "serve the same model (and --block-size) on every P and D",
        ), requested
    if requested is not None and requested not in served:
        return fail(
            "models",
            f"model {requested!r} is not served; served: {', '.join(served)}",
            "pass --model with one of the served models",
        ), None
    model = requested or served[0]
    return ok("models", f"{', '.join(served)} (testing with {model})", {"models": served}), model


def completion_not_attempted() -> CheckResult:
    return fail(
        "completion",
        "not attempted: no served model to ask for (see the models line)",
        "pass --model NAME with a model the proxy lists",
    )


_COMPLETION_HINTS = {
    503: "no routable prefill or decode: see the prefill/decode lines above",
    502: "an instance failed the request: the proxy's log names it, then look at "
    "that instance's log",
    504: "an instance timed out: look for KV transfer errors in the instances' "
    "logs (NIC, firewall between P and D, READ/WRITE mismatch)",
    400: "the request was refused: pass --model with a served model",
    429: "the proxy is at --max-inflight: retry, or raise the limit",
}


def completion(model: str, answer: Answer) -> CheckResult:
    """The one test completion through the proxy: the end-to-end proof."""
    request_id = answer.headers.get("x-request-id", "")
    details: dict[str, Any] = {
        "model": model,
        "seconds": round(answer.seconds, 3),
        "status": answer.status,
        "request_id": request_id or None,
    }
    tag = f" (request id {request_id})" if request_id else ""
    if answer.failure is not None:
        hint = (
            "the first request after a start can be slow: retry with --timeout 120; if "
            "it still hangs, the KV transfer stalls (NIC: MORI_DEVICE_NIC, ibv_devinfo; "
            "firewall between P and D; see the instances' logs)"
            if answer.failure == "timeout"
            else "look at the proxy's log"
        )
        return fail("completion", f"POST /v1/completions: {answer.error}", hint, details)
    if not answer.ok:
        return fail(
            "completion",
            f"POST /v1/completions answered {answer.describe()}{tag}",
            _COMPLETION_HINTS.get(
                answer.status or 0, "look at the proxy's and the instances' logs"
            ),
            details,
        )
    text = completion_text(answer)
    details["text"] = text
    if not text:
        return warn(
            "completion",
            f"answered in {ms(answer.seconds)} but with no text{tag}",
            "try another --prompt; if answers stay empty, compare with the decode "
            "instance queried directly",
            details,
        )
    shown = " ".join(text.split())
    shown = shown[:60] + ("..." if len(shown) > 60 else "")
    return ok("completion", f"answered in {ms(answer.seconds)} with text: {shown!r}{tag}", details)


def ready(answer: Answer) -> CheckResult:
    """The proxy's own readiness, as a load balancer sees it."""
    if answer.ok:
        mode = answer.body.get("transfer_mode") if isinstance(answer.body, dict) else None
        return ok("ready", f"/ready 200 ({mode} mode)")
    reason = said(answer.body) if answer.body else answer.describe()
    if reason.endswith("instance is draining"):  # an operator's drain, not a fault
        return warn(
            "ready",
            f"/ready: {answer.describe()}",
            "an operator drained every instance of a role; undrain one "
            "(moriio-proxy admin URL undrain ROLE HOST:PORT) or start another",
        )
    hint = (
        "the proxy is shutting down (SIGTERM); wait for its replacement"
        if reason == "draining"
        else "/ready turns 200 once a prefill and a decode are registered: see the "
        "prefill/decode lines above"
    )
    return fail("ready", f"/ready: {answer.describe()}", hint)
