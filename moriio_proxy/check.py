"""``moriio-proxy check URL``: is this P/D deployment usable, and if not, what to do next.

A P/D deployment fails in ways that look alike from a client (a 503, a hang, a 502), but
each has a different fix: an instance that never registered (no ``proxy_ip``), a
``read_mode`` mismatch, DP>1 together with TP>1 (vLLM 0.32 port collision), TP sizes that do
not divide, an instance the proxy still lists whose server is gone. ``check`` asks the
proxy's own HTTP API (``/health``, ``/admin/instances``, ``/metrics``, ``/v1/models``,
``/ready``), probes each registered instance directly, and sends one small completion
through the proxy, then prints one line per check with ``OK``/``WARN``/``FAIL`` and, for
anything not OK, the next step to take.

Exit status: 0 when nothing FAILed (warnings allowed), 1 when a check FAILed (including an
unreachable proxy, which prints a single line), 2 for bad usage. Every HTTP call is bounded
by a timeout, so ``check`` always finishes. It only reads, except for the one completion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from .protocol import bracket_host, split_host_port

Status = Literal["OK", "WARN", "FAIL"]
# refused: the host answered, nothing listens. connect_timeout / unreachable / dns: no path
# from here (a network boundary, a firewall that drops). timeout: connected, no answer.
FailureKind = Literal["refused", "connect_timeout", "unreachable", "dns", "timeout", "protocol"]
NO_PATH: tuple[FailureKind, ...] = ("connect_timeout", "unreachable", "dns")

DEFAULT_TIMEOUT = 10.0
# Instances are probed with a shorter bound: a dead or firewalled one should not hold the
# whole check for the full --timeout, and a healthy vLLM answers /health in milliseconds.
INSTANCE_TIMEOUT = 3.0
DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_TOKENS = 8
DOCS = "see deploy/README.md"

_REGISTER_HINT = (
    "start {role} with proxy_ip/proxy_ping_port pointing at this proxy "
    "(deploy/scripts/{script}.sh sets both; with --discovery kubernetes the {role} pods must "
    "be Ready and match the proxy's selector); {docs}"
)


@dataclass
class CheckResult:
    """One verdict line: what was checked, how it went, and what to do about it."""

    name: str
    status: Status
    message: str
    hint: str = ""  # the next step; empty when OK
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "hint": self.hint or None,
            "details": self.details,
        }


@dataclass
class Report:
    """All verdicts of one run; ``aborted`` when the proxy itself could not be reached."""

    url: str
    results: list[CheckResult]
    elapsed: float
    aborted: bool = False

    @property
    def status(self) -> Status:
        statuses = {r.status for r in self.results}
        if "FAIL" in statuses:
            return "FAIL"
        return "WARN" if "WARN" in statuses else "OK"

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "FAIL" else 0

    def by_name(self, name: str) -> CheckResult:
        """The (first) result of a check; tests and scripts look verdicts up by name."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def summary(self) -> str:
        fails = [r.name for r in self.results if r.status == "FAIL"]
        warns = [r.name for r in self.results if r.status == "WARN"]
        oks = sum(r.status == "OK" for r in self.results)
        counts = f"{oks} OK, {len(warns)} WARN, {len(fails)} FAIL in {self.elapsed:.1f}s"
        if fails:
            return (
                f"summary: FAIL ({counts}) for {self.url}: fix {', '.join(fails)} "
                "(the first FAIL line first: later ones often follow from it)"
            )
        if warns:
            return (
                f"summary: OK with warnings ({counts}) for {self.url}: nothing failed; "
                f"look at {', '.join(warns)}"
            )
        return f"summary: OK ({counts}) for {self.url}: the deployment serves completions"

    def to_text(self) -> str:
        """One line per check, then the summary; a single line when the proxy is down."""
        width = max((len(r.name) for r in self.results), default=0)
        lines = [_line(r, width) for r in self.results]
        if not self.aborted:
            lines.append(self.summary())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "exit_code": self.exit_code,
            "elapsed_seconds": round(self.elapsed, 3),
            "summary": self.summary(),
            "checks": [r.to_dict() for r in self.results],
        }


def _line(result: CheckResult, width: int) -> str:
    text = f"{result.status:<4}  {result.name:<{width}}  {result.message}"
    if result.hint:
        text += f" -> next: {result.hint}"
    return text.replace("\r", " ").replace("\n", " ")


# ------------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    """An HTTP answer, or why there is none (``failure``), with how long it took."""

    url: str
    seconds: float
    status: int | None = None
    body: Any = None  # parsed JSON, else the text
    headers: dict[str, str] = field(default_factory=dict)  # names lowercased
    failure: FailureKind | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    def describe(self) -> str:
        """What went wrong, in words a person recognises."""
        if self.failure is not None:
            return self.error
        return f"HTTP {self.status}" + (f": {_error_message(self.body)}" if self.body else "")


def _error_message(body: Any) -> str:
    """vLLM's and the proxy's ``{"error": {"message": ...}}``, else a short excerpt."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(body.get("reason"), str):
            return body["reason"]
    text = body if isinstance(body, str) else json.dumps(body)
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


# The connect phase gets most of the budget, and its own error: a connect that never
# completes (no path from here) is told apart from a server that accepted and never answered.
_CONNECT_SHARE = 0.9
_CONNECT_TIMEOUT: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(aiohttp, "ConnectionTimeoutError", None),) if t is not None
)


def _classify(exc: BaseException, timeout: float) -> tuple[FailureKind, str]:
    """Map aiohttp's exceptions onto the few cases that need different next steps."""
    if isinstance(exc, _CONNECT_TIMEOUT):
        return "connect_timeout", (
            f"connect timed out after {timeout * _CONNECT_SHARE:g}s (no route, or a firewall "
            "drops the packets)"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", f"no answer within {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, socket.gaierror):
            return "dns", f"cannot resolve host {exc.host!r}"
        code = getattr(os_error, "errno", None)
        if code == errno.ECONNREFUSED:
            return "refused", "connection refused"
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return (
                "unreachable",
                f"no route to {exc.host} ({getattr(os_error, 'strerror', os_error)})",
            )
        return "unreachable", f"cannot connect: {getattr(os_error, 'strerror', None) or os_error}"
    return "protocol", f"{type(exc).__name__}: {exc}"


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    timeout: float,
    payload: dict[str, Any] | None = None,
) -> Answer:
    """One bounded request; never raises for network trouble, it reports it."""
    started = time.monotonic()
    try:
        async with session.request(
            method,
            url,
            json=payload,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout * _CONNECT_SHARE),
        ) as resp:
            text = await resp.text(errors="replace")
            try:
                body: Any = json.loads(text) if text else None
            except ValueError:
                body = text
            return Answer(
                url,
                time.monotonic() - started,
                status=resp.status,
                body=body,
                headers={k.lower(): v for k, v in resp.headers.items()},
            )
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        kind, error = _classify(exc, timeout)
        return Answer(url, time.monotonic() - started, failure=kind, error=error)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# ------------------------------------------------------------------------------ checks


def normalize_url(text: str) -> str:
    """``http://host:port`` from what a person types (``host:port``, a trailing ``/v1``).

    Raises ValueError for anything that cannot be a proxy URL, which the CLI turns into
    exit status 2 (bad usage) rather than a FAIL about the deployment.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("URL is empty")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL must be http:// or https://, got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"URL has a bad port: {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"URL has no host: {text!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    netloc = bracket_host(parts.hostname) + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}{path}"


def _instance_url(http_address: str) -> str:
    host, port = split_host_port(http_address)
    return f"http://{bracket_host(host)}:{port}"


def _label(inst: dict[str, Any]) -> str:
    return f"{inst.get('role', '?')} {inst.get('http_address', '?')}"


def _rejections(metrics_text: str) -> dict[str, float]:
    """``moriio_proxy_registrations_rejected_total`` by reason, from the proxy's /metrics."""
    out: dict[str, float] = {}
    prefix = "moriio_proxy_registrations_rejected_total{"
    for line in metrics_text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line[len(prefix) :].partition("} ")
        for pair in labels.split(","):
            key, _, quoted = pair.partition("=")
            if key == "reason":
                with contextlib.suppress(ValueError):
                    out[quoted.strip('"')] = float(value)
    return out


class _Checker:
    """Runs the checks in order and collects their verdicts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        model: str | None,
        timeout: float,
        max_tokens: int,
        prompt: str,
    ) -> None:
        self.session = session
        self.url = url
        self.model = model
        self.timeout = timeout
        self.instance_timeout = min(timeout, INSTANCE_TIMEOUT)
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.results: list[CheckResult] = []

    def add(
        self,
        name: str,
        status: Status,
        message: str,
        hint: str = "",
        details: dict[str, Any] | None = None,
    ) -> CheckResult:
        result = CheckResult(name, status, message, hint if status != "OK" else "", details or {})
        self.results.append(result)
        return result

    async def get(self, path: str) -> Answer:
        return await _call(self.session, "GET", self.url + path, self.timeout)

    async def run(self) -> bool:
        """All checks; False when the proxy is unreachable (then one FAIL line only)."""
        health = await self.get("/health")
        if not self.check_proxy(health):
            return False
        admin, metrics, models, ready = await asyncio.gather(
            self.get("/admin/instances"),
            self.get("/metrics"),
            self.get("/v1/models"),
            self.get("/ready"),
        )
        instances = self.check_instances(admin)
        if instances:
            self.check_roles(instances)
            self.check_mode(admin.body, instances, metrics)
            self.check_parallelism(instances)
            self.check_states(instances)
        probed = await asyncio.gather(*(self.probe(inst) for inst in instances))
        self.results.extend(verdict for verdict, _ in probed)
        probes = [answers for _, answers in probed]
        model = self.check_models(models, list(zip(instances, probes, strict=True)))
        await self.check_completion(model)
        self.check_ready(ready)
        return True

    # -- the proxy itself

    def check_proxy(self, health: Answer) -> bool:
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
            self.add("proxy", "FAIL", f"{what} {self.url}: {health.error}", hint)
            return False
        if not health.ok:
            self.add(
                "proxy",
                "FAIL",
                f"{self.url}/health answered {health.describe()}",
                "is this the proxy's HTTP port (default 10001)? " + DOCS,
            )
            return False
        self.add("proxy", "OK", f"{self.url} answers /health ({_ms(health.seconds)})")
        return True

    # -- what the proxy has registered

    def check_instances(self, admin: Answer) -> list[dict[str, Any]]:
        body = admin.body
        if (
            not admin.ok
            or not isinstance(body, dict)
            or not isinstance(body.get("instances"), list)
        ):
            self.add(
                "instances",
                "FAIL",
                f"GET /admin/instances: {admin.describe()}",
                "point check at the moriio-proxy itself (not at a vLLM instance), at the "
                "same port clients use",
            )
            return []
        instances = [i for i in body["instances"] if isinstance(i, dict)]
        n_p = sum(i.get("role") == "P" for i in instances)
        n_d = sum(i.get("role") == "D" for i in instances)
        if not instances:
            self.add(
                "instances",
                "FAIL",
                "no instance registered",
                "start the prefill and decode instances with proxy_ip/proxy_ping_port "
                "pointing at this proxy, after the proxy (the port trap); " + DOCS,
            )
            return []
        self.add(
            "instances",
            "OK",
            f"{len(instances)} registered: {n_p} prefill, {n_d} decode",
            details={"instances": instances},
        )
        return instances

    def check_roles(self, instances: list[dict[str, Any]]) -> None:
        for role, name, script in (("P", "prefill", "prefill"), ("D", "decode", "decode")):
            mine = [i for i in instances if i.get("role") == role]
            live = [i for i in mine if i.get("state") != "stale"]
            addresses = ", ".join(str(i.get("http_address")) for i in mine)
            if not mine:
                self.add(
                    name,
                    "FAIL",
                    f"no {name} instance registered",
                    _REGISTER_HINT.format(role=name, script=script, docs=DOCS),
                )
            elif not live:
                self.add(
                    name,
                    "FAIL",
                    f"no live {name} instance: {addresses} stopped sending heartbeats",
                    f"restart the {name} instance(s) and look at their logs; a heartbeat "
                    "stops when the vLLM worker exits",
                )
            else:
                self.add(name, "OK", f"{len(live)} live: {addresses}")

    def check_mode(self, body: Any, instances: list[dict[str, Any]], metrics: Answer) -> None:
        in_force = body.get("transfer_mode") if isinstance(body, dict) else None
        modes = sorted({str(i.get("transfer_mode")) for i in instances})
        rejected = _rejections(metrics.body) if metrics.ok and isinstance(metrics.body, str) else {}
        conflicts = int(rejected.get("mode_conflict", 0))
        if len(modes) > 1 or (in_force and modes and modes != [in_force]):
            self.add(
                "transfer-mode",
                "FAIL",
                f"instances disagree on the transfer mode: {', '.join(modes)} "
                f"(in force: {in_force})",
                'give every P and D the same read_mode ("true" for READ, omitted for '
                "WRITE; TRANSFER_MODE in the deploy env file) and restart the odd ones",
            )
        elif conflicts:
            self.add(
                "transfer-mode",
                "WARN",
                f"{in_force} in force, but {conflicts} registration(s) were refused for "
                "the other mode (moriio_proxy_registrations_rejected_total"
                '{reason="mode_conflict"})',
                f"an instance runs with the other read_mode and is not routed: set it to "
                f"{in_force} like the others and restart it (the proxy log names it)",
                details={"mode": in_force, "mode_conflicts": conflicts},
            )
        else:
            self.add(
                "transfer-mode", "OK", f"{in_force} on every instance", details={"mode": in_force}
            )

    def check_parallelism(self, instances: list[dict[str, Any]]) -> None:
        problems: list[str] = []
        warnings: list[str] = []
        for inst in instances:
            dp, tp = int(inst.get("dp_size") or 1), int(inst.get("tp_size") or 1)
            if dp > 1 and tp > 1:
                problems.append(
                    f"{_label(inst)} has DP={dp} with TP={tp}: vLLM 0.32 gives its workers "
                    "colliding MoRI-IO ports (base + dp_rank + tp_rank)"
                )
        prefills = [i for i in instances if i.get("role") == "P"]
        decodes = [i for i in instances if i.get("role") == "D"]
        pairs = sorted(
            {
                (int(p.get("tp_size") or 1), int(d.get("tp_size") or 1))
                for p in prefills
                for d in decodes
            }
        )
        for p_tp, d_tp in pairs:
            if p_tp == d_tp:
                continue
            if max(p_tp, d_tp) % min(p_tp, d_tp):
                problems.append(
                    f"prefill TP={p_tp} and decode TP={d_tp} do not divide evenly: "
                    "MoRI-IO maps TP ranks only when one size is a multiple of the other"
                )
            else:
                warnings.append(
                    f"heterogeneous TP (prefill {p_tp}, decode {d_tp}): vLLM 0.32 allows it "
                    "only for MLA models or when the model's KV heads are at least the "
                    "smaller TP size"
                )
        shapes = ", ".join(
            f"{_label(i)} dp={i.get('dp_size')} tp={i.get('tp_size')}" for i in instances
        )
        if problems:
            self.add(
                "parallelism",
                "FAIL",
                "; ".join(problems),
                "relaunch with DP>1 and TP=1, or TP>1 and DP=1, and TP sizes where one "
                "divides the other (the deploy scripts refuse DP>1 with TP>1); " + DOCS,
            )
        elif warnings:
            self.add(
                "parallelism",
                "WARN",
                "; ".join(warnings),
                "keep prefill and decode TP equal unless the model meets that rule",
            )
        else:
            self.add("parallelism", "OK", shapes)

    def check_states(self, instances: list[dict[str, Any]]) -> None:
        bad: list[str] = []
        for inst in instances:
            state = inst.get("state")
            if state == "ejected":
                bad.append(
                    f"{_label(inst)} ejected after {inst.get('consecutive_failures')} "
                    "consecutive failures"
                )
            elif state == "stale":
                bad.append(
                    f"{_label(inst)} stale: no heartbeat for "
                    f"{inst.get('seconds_since_heartbeat')}s, about to be evicted"
                )
            elif state not in ("healthy", None):
                bad.append(f"{_label(inst)} in state {state!r}")
        if bad:
            self.add(
                "states",
                "WARN",
                "; ".join(bad),
                "look at those instances' logs and at moriio_proxy_upstream_errors_total; an "
                "ejected instance rests --eject-seconds, then gets one more try",
            )
        else:
            self.add("states", "OK", f"all {len(instances)} healthy")

    # -- each instance, directly

    async def probe(self, inst: dict[str, Any]) -> tuple[CheckResult, tuple[Answer, Answer] | None]:
        """GET the instance's /health and /v1/models directly, as the proxy would.

        Returns the verdict (added by the caller, in registration order) and the answers.
        """
        try:
            base = _instance_url(str(inst.get("http_address")))
        except ValueError:
            verdict = CheckResult(
                f"reach {_label(inst)}",
                "FAIL",
                "its http_address is not HOST:PORT",
                "fix http_port/host_ip of that instance",
            )
            return verdict, None
        health, models = await asyncio.gather(
            _call(self.session, "GET", base + "/health", self.instance_timeout),
            _call(self.session, "GET", base + "/v1/models", self.instance_timeout),
        )
        return self._reach_verdict(inst, base, health, models), (health, models)

    def _reach_verdict(
        self, inst: dict[str, Any], base: str, health: Answer, models: Answer
    ) -> CheckResult:
        name = f"reach {_label(inst)}"
        if health.failure in NO_PATH:
            return CheckResult(
                name,
                "WARN",
                f"unreachable from this host ({health.error}); the proxy may still reach it "
                "over its own network",
                "run check on the proxy's host to test the path the proxy uses; the "
                "completion line tells whether the proxy gets through",
                {"url": base, "failure": health.failure},
            )
        if health.failure == "refused":
            return CheckResult(
                name,
                "FAIL",
                f"connection refused at {base}: the host answers but nothing listens on "
                "that port (vLLM's server is down or restarting, or a firewall rejects)",
                "look at that instance's log and restart it; check that --port equals http_port",
                {"url": base, "failure": "refused"},
            )
        if health.failure is not None:
            return CheckResult(
                name,
                "FAIL",
                f"{base} accepted the connection but /health failed ({health.error}): the "
                "server is hung or overloaded",
                "look at that instance's log; restart it if it stays hung",
                {"url": base, "failure": health.failure},
            )
        if not health.ok:
            return CheckResult(
                name,
                "FAIL",
                f"/health answered {health.describe()}: the engine is dead or not loaded",
                "look at that instance's log (an EngineCore fatal error kills the engine); "
                "restart it",
                {"url": base, "status": health.status},
            )
        served = _model_ids(models.body) if models.ok else []
        if not served:
            return CheckResult(
                name,
                "WARN",
                f"/health OK but /v1/models: {models.describe() or 'empty'}",
                "look at that instance's log",
                {"url": base},
            )
        return CheckResult(
            name,
            "OK",
            f"/health OK ({_ms(health.seconds)}), serves {', '.join(served)}",
            details={"url": base, "models": served},
        )

    # -- models, one completion, /ready

    def check_models(
        self,
        answer: Answer,
        probed: list[tuple[dict[str, Any], tuple[Answer, Answer] | None]],
    ) -> str | None:
        served = _model_ids(answer.body) if answer.ok else []
        if not served:
            self.add(
                "models",
                "FAIL",
                f"GET /v1/models: {answer.describe() or 'no model listed'}",
                "the proxy lists the models of its live instances: get a prefill and a "
                "decode registered and answering (see the lines above)",
            )
            return self.model
        by_role: dict[str, set[str]] = {"P": set(), "D": set()}
        for inst, probe in probed:
            if probe is not None and probe[1].ok and inst.get("role") in by_role:
                by_role[str(inst["role"])].update(_model_ids(probe[1].body))
        if by_role["P"] and by_role["D"] and not by_role["P"] & by_role["D"]:
            self.add(
                "models",
                "FAIL",
                f"prefill serves {', '.join(sorted(by_role['P']))} but decode serves "
                f"{', '.join(sorted(by_role['D']))}",
                "serve the same model (and --block-size) on every P and D",
            )
            return self.model
        if self.model is not None and self.model not in served:
            self.add(
                "models",
                "FAIL",
                f"model {self.model!r} is not served; served: {', '.join(served)}",
                "pass --model with one of the served models",
            )
            return None
        model = self.model or served[0]
        self.add(
            "models",
            "OK",
            f"{', '.join(served)} (testing with {model})",
            details={"models": served},
        )
        return model

    async def check_completion(self, model: str | None) -> None:
        if model is None:
            self.add(
                "completion",
                "FAIL",
                "not attempted: no served model to ask for (see the models line)",
                "pass --model NAME with a model the proxy lists",
            )
            return
        payload = {
            "model": model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": False,
        }
        answer = await _call(
            self.session, "POST", self.url + "/v1/completions", self.timeout, payload
        )
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
            self.add("completion", "FAIL", f"POST /v1/completions: {answer.error}", hint, details)
            return
        if not answer.ok:
            hint = {
                503: "no routable prefill or decode: see the prefill/decode lines above",
                502: "an instance failed the request: the proxy's log names it, then look at "
                "that instance's log",
                504: "an instance timed out: look for KV transfer errors in the instances' "
                "logs (NIC, firewall between P and D, READ/WRITE mismatch)",
                400: "the request was refused: pass --model with a served model",
                429: "the proxy is at --max-inflight: retry, or raise the limit",
            }.get(answer.status or 0, "look at the proxy's and the instances' logs")
            self.add(
                "completion",
                "FAIL",
                f"POST /v1/completions answered {answer.describe()}{tag}",
                hint,
                details,
            )
            return
        text = _completion_text(answer.body)
        details["text"] = text
        if not text:
            self.add(
                "completion",
                "WARN",
                f"answered in {_ms(answer.seconds)} but with no text{tag}",
                "try another --prompt; if answers stay empty, compare with the decode "
                "instance queried directly",
                details,
            )
            return
        shown = " ".join(text.split())
        shown = shown[:60] + ("..." if len(shown) > 60 else "")
        self.add(
            "completion",
            "OK",
            f"answered in {_ms(answer.seconds)} with text: {shown!r}{tag}",
            details=details,
        )

    def check_ready(self, ready: Answer) -> None:
        if ready.ok:
            mode = ready.body.get("transfer_mode") if isinstance(ready.body, dict) else None
            self.add("ready", "OK", f"/ready 200 ({mode} mode)")
            return
        reason = _error_message(ready.body) if ready.body else ready.describe()
        hint = (
            "the proxy is shutting down (SIGTERM); wait for its replacement"
            if "draining" in reason
            else "/ready turns 200 once a prefill and a decode are registered: see the "
            "prefill/decode lines above"
        )
        self.add("ready", "FAIL", f"/ready: {ready.describe()}", hint)


def _model_ids(body: Any) -> list[str]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _completion_text(body: Any) -> str:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    text = choices[0].get("text")
    return text if isinstance(text, str) else ""


async def run_check(
    url: str,
    *,
    model: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str = DEFAULT_PROMPT,
) -> Report:
    """Check the deployment behind the proxy at ``url``; never raises for network trouble.

    ``url`` may be ``host:port``; it is normalised as on the command line (ValueError when
    it cannot be a URL). Every call is bounded by ``timeout`` (instances by at most
    ``INSTANCE_TIMEOUT``), so the whole check ends in a few timeouts at worst.
    """
    base = normalize_url(url)
    started = time.monotonic()
    async with aiohttp.ClientSession(raise_for_status=False) as session:
        checker = _Checker(
            session, base, model=model, timeout=timeout, max_tokens=max_tokens, prompt=prompt
        )
        reached = await checker.run()
    return Report(base, checker.results, time.monotonic() - started, aborted=not reached)


# --------------------------------------------------------------------------------- CLI


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``check`` subcommand, added to the CLI's subparsers."""
    parser = sub.add_parser(
        "check",
        help="check a running deployment through its proxy",
        description="Inspect a running P/D deployment through the proxy's HTTP API, probe "
        "each registered instance, send one small completion, and print one OK/WARN/FAIL "
        "line per check with the next step for anything not OK. Exit status: 0 nothing "
        "failed (warnings allowed), 1 a check failed, 2 bad usage.",
    )
    parser.add_argument("url", metavar="URL", help="the proxy, e.g. http://10.0.0.1:10001")
    parser.add_argument(
        "--model", default=None, help="model of the test completion (default: the first listed)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        help=f"seconds allowed for each call (default {DEFAULT_TIMEOUT:g}; the direct "
        f"instance probes: at most {INSTANCE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive(int),
        default=DEFAULT_MAX_TOKENS,
        help=f"of the test completion (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"of the test completion (default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of lines"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``check`` for parsed arguments; prints the report and returns the exit status."""
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        print(f"moriio-proxy check: error: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(
        run_check(
            url,
            model=args.model,
            timeout=args.timeout,
            max_tokens=args.max_tokens,
            prompt=args.prompt,
        )
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.to_text(), flush=True)
    return report.exit_code
