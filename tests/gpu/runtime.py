"""Running a planned scenario on real nodes: processes, readiness, requests, teardown.

Synchronous on purpose: the suite waits minutes for models to load and then sends a handful
of requests, and plain blocking calls with explicit timeouts are the easiest to read back in
a failure report. Every process runs in its own session so the suite can stop (or, for the
failover test, SIGKILL) exactly the processes it started, workers included, and every
process logs to its own file whose tail is attached to each failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.gpu.config import GpuSettings
from tests.gpu.evidence import OutcomeKind, classify_outcome, completion_text, parse_sse
from tests.gpu.plan import REPO, Launch, LaunchPlan

# Distinct from their first words on, so no two prompts share a KV block: a decode's own
# prefix cache can then never stand in for a transfer. Long enough for several blocks.
PROMPTS: tuple[str, ...] = (
    "Explain, step by step, how a lighthouse keeper in the nineteenth century kept the lamp "
    "burning through a winter storm, what fuel was used, how the lens concentrated the "
    "light, and why the rotation speed of the lens mattered to passing ships.",
    "Photosynthesis converts light into chemical energy. Describe the light-dependent "
    "reactions and the Calvin cycle, name the molecules that carry energy between them, and "
    "say where in the chloroplast each stage takes place.",
    "Write a short story about a retired cartographer who discovers that one of the maps she "
    "drew forty years ago contains an island that does not exist, and who decides to sail "
    "there anyway with her grandson.",
    "List the main differences between TCP and UDP, including connection setup, ordering, "
    "retransmission, congestion control and header size, and give one application for which "
    "each protocol is the better choice, with a reason.",
    "Summarise the causes of the French Revolution, covering the fiscal crisis of the "
    "monarchy, the role of the Estates-General, Enlightenment ideas, bread prices and the "
    "events of the summer of 1789.",
    "Quantum tunnelling lets a particle cross a barrier it classically could not. Explain "
    "the idea with the wave function, describe how a scanning tunnelling microscope uses "
    "it, and estimate how the current depends on the tip distance.",
    "Plan a three-day hiking trip in the Scottish Highlands for two beginners in late "
    "spring: the route, daily distances, what to pack against rain and midges, and how to "
    "stay safe when the weather turns.",
    "Given the Python function def f(n): return n if n < 2 else f(n - 1) + f(n - 2), "
    "explain its running time, rewrite it with memoisation and then iteratively, and compare "
    "the memory each version uses for n equal to one hundred.",
)
WARMUP_PROMPT = "Warm-up request before measuring: reply with one short sentence."


class DeploymentError(AssertionError):
    """A process died, never became ready, or ran something else than planned."""


class ProcessExited(DeploymentError):
    """A process ended while the suite waited for it: no point waiting any longer."""


@dataclass
class Completion:
    """One request's result, as the test judges it."""

    prompt: str
    status: int | None
    body: Any
    seconds: float
    started: float
    transport_error: str | None = None
    streamed: bool = False
    text: str = ""
    prompt_tokens: int | None = None
    stream_done: bool = True
    stream_errors: list[str] = field(default_factory=list)

    @property
    def kind(self) -> OutcomeKind:
        if self.streamed and self.status == 200:
            return "ok" if self.stream_done and not self.stream_errors else "unclean"
        return classify_outcome(self.status, self.body, self.transport_error)

    def describe(self) -> str:
        what = self.transport_error or f"HTTP {self.status}"
        return f"{what} after {self.seconds:.1f}s: {json.dumps(self.body)[:300]}"


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One JSON call; HTTP errors are returned as (status, body), transport errors raise."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def http_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


def complete(
    base_url: str,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    timeout: float,
    stream: bool = False,
) -> Completion:
    """A greedy /v1/completions request (temperature 0, fixed seed), never raising."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.time()
    clock = time.monotonic()
    request = urllib.request.Request(
        base_url + "/v1/completions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut
        reason = getattr(exc, "reason", exc)
        return Completion(
            prompt, None, None, time.monotonic() - clock, started, f"{type(exc).__name__}: {reason}"
        )
    seconds = time.monotonic() - clock
    if stream and status == 200:
        text, usage, done, errors = parse_sse(raw)
        return Completion(
            prompt,
            status,
            None,
            seconds,
            started,
            streamed=True,
            text=text,
            prompt_tokens=(usage or {}).get("prompt_tokens"),
            stream_done=done,
            stream_errors=errors,
        )
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return Completion(
        prompt,
        status,
        parsed,
        seconds,
        started,
        text=completion_text(parsed) or "",
        prompt_tokens=usage.get("prompt_tokens") if isinstance(usage, dict) else None,
    )


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, *, interval: float = 2.0
) -> None:
    """Poll ``predicate`` until true; DeploymentError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass  # not up yet
        if time.monotonic() > deadline:
            raise DeploymentError(f"{what}: not reached within {timeout:g}s")
        time.sleep(interval)


class Process:
    """One launched process and its log; owns its process group (its own session)."""

    def __init__(self, launch: Launch, log_path: Path) -> None:
        self.launch = launch
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.launch.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.launch.environment(os.environ),
            cwd=REPO,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the whole group this process leads (vLLM's workers included)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (vLLM shuts down cleanly), then SIGKILL after ``grace`` seconds."""
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(30)
        # Workers may outlive the leader for a moment: kill what is left of the group and
        # wait for it to be gone, so the next scenario finds its GPUs free.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._wait_group_gone(60)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the group at once: a crash, as the failover test needs."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(60)
            self._wait_group_gone(60)

    def _wait_group_gone(self, timeout: float) -> None:
        if self.popen is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.popen.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)

    def first_line(self) -> str | None:
        """The command the deploy script printed before exec-ing it."""
        try:
            with self.log_path.open("rb") as log:
                line = log.readline().decode(errors="replace")
        except OSError:
            return None
        return line.rstrip("\r\n") or None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Deployment:
    """A scenario's processes, proxy first, torn down in reverse order."""

    def __init__(
        self, plan: LaunchPlan, settings: GpuSettings, log_dir: Path, *, poll: float = 2.0
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.log_dir = log_dir / plan.scenario.name
        self.poll = poll  # seconds between readiness probes (model loads take minutes)
        self.processes: dict[str, Process] = {}
        self._restarts = 0

    @property
    def proxy_url(self) -> str:
        return self.plan.proxy_url

    @property
    def model(self) -> str:
        assert self.settings.model is not None
        return self.settings.model

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, launch: Launch, suffix: str = "") -> Process:
        process = Process(launch, self.log_dir / f"{launch.name}{suffix}.log")
        process.start()
        self.processes[launch.name] = process
        return process

    def start(self) -> None:
        proxy = self._spawn(self.plan.proxy)
        self._wait_http(proxy, "/health", 60)
        for launch in self.plan.launches[1:]:
            self._spawn(launch)
        for launch in self.plan.launches[1:]:
            self._wait_http(self.processes[launch.name], "/health", self.settings.startup_timeout)
        self._wait_registered([launch.http_address for launch in self.plan.launches[1:]])
        for process in self.processes.values():
            self._check_command(process)
        self._warm_up()

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def restart(self, name: str) -> Process:
        """Start a stopped or killed instance again and wait until the proxy routes it."""
        launch = self.plan.by_name(name)
        self._restarts += 1
        process = self._spawn(launch, f".restart{self._restarts}")
        self._wait_http(process, "/health", self.settings.startup_timeout)
        self._wait_registered([launch.http_address])
        self._check_command(process)
        return process

    def _wait_http(self, process: Process, path: str, timeout: float) -> None:
        def up() -> bool:
            if not process.alive:
                code = process.popen.returncode if process.popen else None
                raise ProcessExited(
                    f"{process.launch.name} exited with status {code} before answering "
                    f"{path}\n{self.diagnostics([process])}"
                )
            status, _ = http_json("GET", process.launch.url + path, timeout=5)
            return status == 200

        try:
            wait_until(f"{process.launch.name} {path} answers 200", up, timeout, interval=self.poll)
        except ProcessExited:
            raise
        except DeploymentError as exc:
            raise DeploymentError(f"{exc}\n{self.diagnostics([process])}") from None

    def _wait_registered(self, addresses: Sequence[str]) -> None:
        def registered() -> bool:
            status, body = http_json("GET", self.proxy_url + "/admin/instances", timeout=5)
            listed = (
                {i.get("http_address") for i in body.get("instances", [])}
                if status == 200
                else set()
            )
            ready, _ = http_json("GET", self.proxy_url + "/ready", timeout=5)
            return ready == 200 and set(addresses) <= listed

        try:
            wait_until(
                f"proxy lists {', '.join(addresses)} and /ready is 200",
                registered,
                120,
                interval=self.poll,
            )
        except DeploymentError as exc:
            raise DeploymentError(f"{exc}\n{self.diagnostics()}") from None

    def _check_command(self, process: Process) -> None:
        """What the script printed (then exec'ed) must be what the plan said it would run."""
        if process.launch.script is None:
            return
        printed = process.first_line()
        if printed != process.launch.command_line:
            raise DeploymentError(
                f"{process.launch.name} ran {printed!r}, planned {process.launch.command_line!r}"
            )

    def _warm_up(self) -> None:
        """One request before measuring: the first one pays for MoRI-IO's handshake."""
        last: Completion | None = None
        for _ in range(3):
            last = self.complete(WARMUP_PROMPT, max_tokens=4)
            if last.kind == "ok":
                return
            time.sleep(5)
        assert last is not None
        raise DeploymentError(f"warm-up request failed: {last.describe()}\n{self.diagnostics()}")

    # -- talking to it

    def complete(
        self, prompt: str, *, max_tokens: int | None = None, stream: bool = False
    ) -> Completion:
        return complete(
            self.proxy_url,
            self.model,
            prompt,
            max_tokens=max_tokens or self.settings.max_tokens,
            timeout=self.settings.request_timeout,
            stream=stream,
        )

    def admin(self) -> dict[str, Any]:
        status, body = http_json("GET", self.proxy_url + "/admin/instances")
        if status != 200 or not isinstance(body, dict):
            raise DeploymentError(f"/admin/instances answered {status}: {body}")
        return body

    def metrics(self, name: str) -> str:
        """An instance's (or the proxy's) Prometheus page."""
        return http_text(self.plan.by_name(name).url + "/metrics")

    def diagnostics(self, processes: Sequence[Process] | None = None) -> str:
        """The log tails to read first, and where the full logs are."""
        chosen = processes if processes is not None else list(self.processes.values())
        parts = [f"logs: {self.log_dir}"]
        for process in chosen:
            parts.append(f"--- {process.log_path.name} (last lines)\n{process.tail()}")
        return "\n".join(parts)


class Reference:
    """Greedy answers of a plain vLLM (no P/D), one run per TP size, cached for the session."""

    def __init__(self, settings: GpuSettings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self._cache: dict[int, list[Completion]] = {}

    def outputs(self, launch: Launch, prompts: Sequence[str]) -> list[Completion]:
        tp = int(launch.flag("--tensor-parallel-size") or 1)
        if tp not in self._cache:
            self._cache[tp] = self._run(launch, prompts)
        return self._cache[tp]

    def _run(self, launch: Launch, prompts: Sequence[str]) -> list[Completion]:
        assert self.settings.model is not None
        process = Process(launch, self.log_dir / f"{launch.name}.log")
        process.start()
        try:

            def up() -> bool:
                if not process.alive:
                    raise ProcessExited(f"reference vLLM exited before serving\n{process.tail()}")
                return http_json("GET", launch.url + "/health", timeout=5)[0] == 200

            wait_until("reference /health answers 200", up, self.settings.startup_timeout)
            results = [
                complete(
                    launch.url,
                    self.settings.model,
                    prompt,
                    max_tokens=self.settings.max_tokens,
                    timeout=self.settings.request_timeout,
                )
                for prompt in prompts
            ]
        finally:
            process.stop()
        bad = [r for r in results if r.kind != "ok"]
        if bad:
            raise DeploymentError(
                f"reference failed a request: {bad[0].describe()}\n{process.tail()}"
            )
        return results
