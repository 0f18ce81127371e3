"""What each GPU scenario launches, built by the deploy scripts' own ``--dry-run``.

The GPU suite starts its processes with ``deploy/scripts/proxy.sh``, ``prefill.sh`` and
``decode.sh``, the way an operator does, so a green run also proves the scripts. The plan of
a scenario is what those scripts print under ``--dry-run`` for the scenario's settings: the
exact command lines, roles, ports, transfer mode and DP/TP. Because it needs no GPU, the plan
is tested everywhere (``tests/gpu/test_plan.py``), and a person can print it before booking
a cluster:

    python -m tests.gpu.plan                 # every scenario, from the MORIIO_GPU_* variables
    python -m tests.gpu.plan tp dp-prefill   # some of them

The launch then runs the same script without ``--dry-run``; the script prints the command
first, and the suite checks that this line equals the planned one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.gpu.config import GpuSettings, SettingsError, skip_reason

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "deploy" / "scripts"

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class PlanError(Exception):
    """A scenario cannot be planned: a deploy script refused it, or settings are missing."""


class NotEnoughGpus(PlanError):
    """The GPU lists are too short for a scenario: that scenario skips, the others run."""


@dataclass(frozen=True)
class Scenario:
    """One deployment shape and what a green run of it proves."""

    name: str
    mode: str  # READ or WRITE
    prefill_dp: int = 1
    prefill_tp: int = 1
    decode_dp: int = 1
    decode_tp: int = 1
    prefills: int = 1  # prefill instances (2: one can be killed while the other serves)
    proves: str = ""

    @property
    def gpus_per_prefill(self) -> int:
        return self.prefill_dp * self.prefill_tp

    @property
    def gpus_per_decode(self) -> int:
        return self.decode_dp * self.decode_tp

    @property
    def compares_to_reference(self) -> bool:
        """The failover scenario judges outcomes, not texts: it needs no reference."""
        return self.prefills == 1

    @property
    def reference_tp(self) -> int:
        """The non-disaggregated reference runs at decode's TP: decode computes the tokens."""
        return self.decode_tp


SCENARIO_NAMES = ("read-1p1d", "write-1p1d", "dp-prefill", "tp", "prefill-failover")


def scenarios(settings: GpuSettings) -> dict[str, Scenario]:
    """Every scenario, sized from the settings (DP, TP, the mode for the non-1P1D ones)."""
    items = (
        Scenario(
            "read-1p1d",
            "READ",
            proves="READ mode end to end: decode pulls prefill's KV over RDMA, and the "
            "answers equal a non-disaggregated instance's",
        ),
        Scenario(
            "write-1p1d",
            "WRITE",
            proves="WRITE mode end to end: prefill pushes KV into blocks decode allocated",
        ),
        Scenario(
            "dp-prefill",
            settings.mode,
            prefill_dp=settings.dp,
            proves=f"a DP{settings.dp} prefill: the proxy spreads requests over every DP rank "
            "(X-data-parallel-rank) and decode fetches KV from each rank's ports",
        ),
        Scenario(
            "tp",
            settings.mode,
            prefill_tp=settings.tp,
            decode_tp=settings.tp,
            proves=f"TP{settings.tp} on both sides: every TP worker's KV shard arrives",
        ),
        Scenario(
            "prefill-failover",
            settings.mode,
            prefills=2,
            proves="a prefill killed mid-run: requests fail cleanly or are retried on the "
            "other prefill, the dead one is evicted, and a restarted one rejoins",
        ),
    )
    return {s.name: s for s in items}


def port_layout(base: int) -> dict[str, int]:
    """Every port of a scenario, from one base below the ephemeral range (the port trap).

    Each MoRI-IO base gets 100 ports, room for ``dp_size * tp_size`` workers.
    """
    return {
        "proxy_http": base + 1,
        "proxy_discovery": base + 2,
        "prefill_http": base + 10,
        "prefill_handshake": base + 100,
        "prefill_notify": base + 200,
        "prefill-2_http": base + 11,
        "prefill-2_handshake": base + 300,
        "prefill-2_notify": base + 400,
        "decode_http": base + 20,
        "decode_handshake": base + 500,
        "decode_notify": base + 600,
        "reference_http": base + 30,
    }


# Deployment variables the scripts read. They are removed from the inherited environment
# of a launch so a stray shell variable cannot make the real command differ from the plan.
_DEPLOY_EXACT = {
    "MODEL",
    "HOST_IP",
    "TRANSFER_MODE",
    "BACKEND",
    "BLOCK_SIZE",
    "KV_EXTRA_CONFIG",
    "VLLM",
}
_DEPLOY_PREFIX = re.compile(r"^(PREFILL_|DECODE_|PROXY_|MORIIO_(?!GPU_))")


def clean_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without any variable the deploy scripts or ``moriio-proxy`` would read."""
    return {k: v for k, v in base.items() if k not in _DEPLOY_EXACT and not _DEPLOY_PREFIX.match(k)}


@dataclass(frozen=True)
class Launch:
    """One process of a scenario: how it is started and the command that ends up running."""

    name: str  # proxy, prefill, prefill-2, decode, reference
    role: str  # proxy, P, D, reference
    host: str
    http_port: int
    gpus: tuple[int, ...]
    command: tuple[str, ...]  # what runs: the script's --dry-run line, split
    script: Path | None = None  # None: run ``command`` directly (the reference)
    script_env: Mapping[str, str] = field(default_factory=dict)
    script_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)  # MORI_DEVICE_NIC, ...
    ssh: str | None = None
    remote_repo: str | None = None

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    def kv_config(self) -> dict[str, Any] | None:
        """The ``--kv-transfer-config`` of a vLLM command, parsed."""
        if "--kv-transfer-config" not in self.command:
            return None
        return json.loads(self.command[self.command.index("--kv-transfer-config") + 1])

    def flag(self, name: str) -> str | None:
        """The value after ``name`` in the command, if present."""
        if name not in self.command:
            return None
        return self.command[self.command.index(name) + 1]

    def argv(self) -> list[str]:
        """What to execute: the deploy script without --dry-run (or over ssh on decode's node)."""
        if self.script is None:
            return list(self.command)
        local = ["bash", str(self.script), *self.script_args]
        if self.ssh is None:
            return local
        repo = self.remote_repo or str(REPO)
        assignments = [f"{k}={v}" for k, v in {**self.script_env, **self.extra_env}.items()]
        script = f"{repo}/deploy/scripts/{self.script.name}"
        remote = shlex.join(["env", *assignments, "bash", script, *self.script_args])
        # -tt: the remote command gets a terminal, so closing ssh (the suite's stop) hangs
        # it up instead of leaving vLLM running on the other node.
        return [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-tt",
            self.ssh,
            f"cd {shlex.quote(repo)} && {remote}",
        ]

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The process environment: ``base`` cleaned of deploy variables, plus ours."""
        return {**clean_environment(base), **self.script_env, **self.extra_env}

    def describe(self) -> str:
        where = f"{self.host}" + (f" via ssh {self.ssh}" if self.ssh else "")
        gpus = ",".join(map(str, self.gpus)) or "-"
        how = f"deploy/scripts/{self.script.name}" if self.script else "direct"
        return (
            f"  {self.name} ({self.role}) on {where}, GPUs {gpus}, {how}:\n    {self.command_line}"
        )


@dataclass(frozen=True)
class LaunchPlan:
    """A scenario's processes, proxy first (instances must find it listening)."""

    scenario: Scenario
    proxy: Launch
    prefills: tuple[Launch, ...]
    decode: Launch

    @property
    def launches(self) -> tuple[Launch, ...]:
        return (self.proxy, *self.prefills, self.decode)

    @property
    def proxy_url(self) -> str:
        return self.proxy.url

    def by_name(self, name: str) -> Launch:
        for launch in self.launches:
            if launch.name == name:
                return launch
        raise KeyError(name)

    def describe(self) -> str:
        head = f"{self.scenario.name} ({self.scenario.mode}): {self.scenario.proves}"
        return "\n".join([head, *(launch.describe() for launch in self.launches)])


def dry_run(
    script: Path,
    env: Mapping[str, str],
    args: Sequence[str] = (),
    *,
    runner: Runner = subprocess.run,
) -> tuple[str, ...]:
    """The command ``script --dry-run`` prints for ``env``; PlanError with its refusal."""
    result = runner(
        ["bash", str(script), "--dry-run", *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        reason = errors[0] if errors else result.stderr.strip() or f"exit {result.returncode}"
        raise PlanError(reason)
    lines = result.stdout.splitlines()
    if len(lines) != 1:
        raise PlanError(f"{script.name} --dry-run printed {len(lines)} lines, expected one")
    return tuple(shlex.split(lines[0]))


def proxy_bin() -> str:
    """The ``moriio-proxy`` of this environment (the one under test)."""
    beside = Path(sys.executable).parent / "moriio-proxy"
    if beside.exists():
        return str(beside)
    return shutil.which("moriio-proxy") or "moriio-proxy"


def _gpus(available: tuple[int, ...], start: int, count: int) -> tuple[int, ...]:
    return available[start : start + count]


def build_plan(
    scenario: Scenario, settings: GpuSettings, *, runner: Runner = subprocess.run
) -> LaunchPlan:
    """Plan ``scenario`` by running each deploy script with ``--dry-run``."""
    if not settings.model:
        raise PlanError("MORIIO_GPU_MODEL unset: the model every instance serves")
    need_p = scenario.gpus_per_prefill * scenario.prefills
    if len(settings.prefill_gpus) < need_p:
        raise NotEnoughGpus(
            f"scenario {scenario.name} needs {need_p} prefill GPUs ({scenario.prefills} x "
            f"DP{scenario.prefill_dp} x TP{scenario.prefill_tp}), MORIIO_GPU_PREFILL_GPUS "
            f"lists {len(settings.prefill_gpus)}"
        )
    if len(settings.decode_gpus) < scenario.gpus_per_decode:
        raise NotEnoughGpus(
            f"scenario {scenario.name} needs {scenario.gpus_per_decode} decode GPUs, "
            f"MORIIO_GPU_DECODE_GPUS lists {len(settings.decode_gpus)}"
        )
    ports = port_layout(settings.port_base)
    decode_gpus = _gpus(settings.decode_gpus, 0, scenario.gpus_per_decode)
    common = {
        "MODEL": settings.model,
        "PROXY_IP": settings.proxy_ip,
        "PROXY_PORT": str(ports["proxy_http"]),
        "PROXY_PING_PORT": str(ports["proxy_discovery"]),
        "TRANSFER_MODE": scenario.mode,
        "BACKEND": settings.backend,
        "BLOCK_SIZE": str(settings.block_size),
        "PREFILL_HOST_IP": settings.prefill_host_ip,
        "DECODE_HOST_IP": settings.decode_host_ip,
        "PREFILL_DP": str(scenario.prefill_dp),
        "PREFILL_TP": str(scenario.prefill_tp),
        "DECODE_PORT": str(ports["decode_http"]),
        "DECODE_HANDSHAKE_PORT": str(ports["decode_handshake"]),
        "DECODE_NOTIFY_PORT": str(ports["decode_notify"]),
        "DECODE_DP": str(scenario.decode_dp),
        "DECODE_TP": str(scenario.decode_tp),
        "DECODE_GPUS": ",".join(map(str, decode_gpus)),
        "VLLM": settings.vllm,
    }
    extra_env = {"MORI_DEVICE_NIC": settings.nic} if settings.nic else {}
    vllm_args = ("--", *settings.vllm_args) if settings.vllm_args else ()

    def prefill_env(index: int) -> tuple[str, dict[str, str], tuple[int, ...]]:
        name = "prefill" if index == 0 else f"prefill-{index + 1}"
        gpus = _gpus(
            settings.prefill_gpus, index * scenario.gpus_per_prefill, scenario.gpus_per_prefill
        )
        env = {
            **common,
            "PREFILL_PORT": str(ports[f"{name}_http"]),
            "PREFILL_HANDSHAKE_PORT": str(ports[f"{name}_handshake"]),
            "PREFILL_NOTIFY_PORT": str(ports[f"{name}_notify"]),
            "PREFILL_GPUS": ",".join(map(str, gpus)),
        }
        return name, env, gpus

    first_prefill = prefill_env(0)[1]
    # The proxy's per-leg bounds are kept under the client's, so a stuck leg surfaces as the
    # proxy's 504 (a clean failure) rather than as the test's own timeout.
    leg_timeout = f"{settings.request_timeout / 2:g}"
    proxy_env = {**first_prefill, "PROXY_BIN": proxy_bin(), "PROXY_LOG_LEVEL": "info"}
    proxy_args = (
        "--",
        "--prefill-timeout",
        leg_timeout,
        "--decode-first-byte-timeout",
        leg_timeout,
    )
    proxy = Launch(
        name="proxy",
        role="proxy",
        host=settings.proxy_ip,
        http_port=ports["proxy_http"],
        gpus=(),
        command=dry_run(SCRIPTS / "proxy.sh", proxy_env, proxy_args, runner=runner),
        script=SCRIPTS / "proxy.sh",
        script_env=proxy_env,
        script_args=proxy_args,
    )
    prefills = []
    for index in range(scenario.prefills):
        name, env, gpus = prefill_env(index)
        try:
            command = dry_run(SCRIPTS / "prefill.sh", env, vllm_args, runner=runner)
        except PlanError as exc:
            raise PlanError(f"prefill.sh refused {scenario.name}/{name}: {exc}") from None
        prefills.append(
            Launch(
                name=name,
                role="P",
                host=settings.prefill_host_ip,
                http_port=int(env["PREFILL_PORT"]),
                gpus=gpus,
                command=command,
                script=SCRIPTS / "prefill.sh",
                script_env=env,
                script_args=vllm_args,
                extra_env=extra_env,
            )
        )
    try:
        decode_command = dry_run(SCRIPTS / "decode.sh", first_prefill, vllm_args, runner=runner)
    except PlanError as exc:
        raise PlanError(f"decode.sh refused {scenario.name}/decode: {exc}") from None
    decode = Launch(
        name="decode",
        role="D",
        host=settings.decode_host_ip,
        http_port=ports["decode_http"],
        gpus=decode_gpus,
        command=decode_command,
        script=SCRIPTS / "decode.sh",
        script_env=first_prefill,
        script_args=vllm_args,
        extra_env=extra_env,
        ssh=settings.decode_ssh if settings.two_nodes else None,
        remote_repo=settings.remote_repo,
    )
    return LaunchPlan(scenario, proxy, tuple(prefills), decode)


def reference_launch(settings: GpuSettings, tp: int) -> Launch:
    """A plain ``vllm serve`` (no KV connector) whose greedy answers P/D must reproduce.

    It is not started by the deploy scripts, which always add MoRI-IO. It runs on the
    first prefill GPUs, between scenarios, when no P/D deployment holds them.
    """
    if not settings.model:
        raise PlanError("MORIIO_GPU_MODEL unset: the model every instance serves")
    if len(settings.prefill_gpus) < tp:
        raise NotEnoughGpus(
            f"the TP{tp} reference needs {tp} GPUs, MORIIO_GPU_PREFILL_GPUS lists "
            f"{len(settings.prefill_gpus)}"
        )
    gpus = settings.prefill_gpus[:tp]
    port = port_layout(settings.port_base)["reference_http"]
    command = (
        "env",
        "HIP_VISIBLE_DEVICES=" + ",".join(map(str, gpus)),
        settings.vllm,
        "serve",
        settings.model,
        "--port",
        str(port),
        "--block-size",
        str(settings.block_size),
        "--tensor-parallel-size",
        str(tp),
        *settings.vllm_args,
    )
    return Launch(
        name=f"reference-tp{tp}",
        role="reference",
        host=settings.prefill_host_ip,
        http_port=port,
        gpus=gpus,
        command=command,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan of the named scenarios (all by default) from MORIIO_GPU_* variables."""
    names = list(argv if argv is not None else sys.argv[1:])
    try:
        settings = GpuSettings.from_env(os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not settings.model:
        settings = replace(settings, model="<MORIIO_GPU_MODEL>")
    table = scenarios(settings)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(
            f"error: unknown scenario {', '.join(unknown)}; known: {', '.join(table)}",
            file=sys.stderr,
        )
        return 2
    for name in names or list(table):
        try:
            plan = build_plan(table[name], settings)
            reference = (
                reference_launch(settings, plan.scenario.reference_tp)
                if plan.scenario.compares_to_reference
                else None
            )
        except PlanError as exc:
            print(f"{name}: cannot plan: {exc}\n")
            continue
        print(plan.describe())
        if reference is not None:
            print(reference.describe())
        print()
    print(f"requirements: {skip_reason(os.environ) or 'all present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
