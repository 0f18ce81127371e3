"""The GPU suite's dry run, on any machine: launch plans, skip reasons, and judgements.

Not gpu-marked: these run in every ``pytest``. The plans come from the real deploy scripts
under ``--dry-run``, so a change to the scripts that would break the GPU suite breaks here
first; the skip reasons are produced against a fake host tree; the functions that judge a
GPU run (KV evidence, greedy equality, outcomes) are fed made-up metrics and bodies.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.config import ENV_DOC, GpuSettings, Probes, SettingsError, skip_reason
from tests.gpu.evidence import (
    BY_SOURCE,
    classify_outcome,
    delta_by_label,
    greedy_problem,
    kv_evidence,
    kv_problems,
    parse_metrics,
    parse_sse,
)
from tests.gpu.plan import (
    REPO,
    SCENARIO_NAMES,
    SCRIPTS,
    Launch,
    LaunchPlan,
    NotEnoughGpus,
    PlanError,
    Scenario,
    build_plan,
    clean_environment,
    port_layout,
    reference_launch,
    scenarios,
)

BASE_ENV = {
    "MORIIO_GPU_MODEL": "org/model",
    "MORIIO_GPU_HOST_IP": "10.0.0.1",
}


def settings_for(**env: str) -> GpuSettings:
    return GpuSettings.from_env({**BASE_ENV, **env}, detect_ip=lambda: "192.0.2.9")


@pytest.fixture(scope="module")
def plans() -> dict[str, LaunchPlan]:
    settings = settings_for()
    return {name: build_plan(s, settings) for name, s in scenarios(settings).items()}


def vllm_argv(launch: Launch) -> tuple[dict[str, str], list[str]]:
    """``env K=V ... vllm serve ...`` split into the environment and vLLM's argv."""
    argv = list(launch.command)
    env: dict[str, str] = {}
    if argv[0] == "env":
        argv.pop(0)
        while "=" in argv[0]:
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
    assert argv[1] == "serve", argv
    return env, argv


def extra(launch: Launch) -> dict[str, Any]:
    config = launch.kv_config()
    assert config is not None
    assert config["kv_connector"] == "MoRIIOConnector"
    return config["kv_connector_extra_config"]


# -- every scenario's plan ----------------------------------------------------------------


def test_every_scenario_is_planned(plans: dict[str, LaunchPlan]) -> None:
    assert tuple(plans) == SCENARIO_NAMES
    for plan in plans.values():
        assert plan.launches[0].role == "proxy"  # started first
        assert plan.scenario.proves


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_proxy_command(plans: dict[str, LaunchPlan], name: str) -> None:
    plan = plans[name]
    ports = port_layout(18000)
    proxy = plan.proxy
    assert proxy.script == SCRIPTS / "proxy.sh"
    assert Path(proxy.command[0]).name == "moriio-proxy" and proxy.command[1] == "serve"
    assert proxy.flag("--port") == str(ports["proxy_http"]) == str(proxy.http_port)
    assert proxy.flag("--discovery-port") == str(ports["proxy_discovery"])
    assert int(proxy.flag("--discovery-port") or 0) < 32768  # below the port trap
    assert proxy.flag("--transfer-mode") == plan.scenario.mode  # pinned
    # Leg timeouts under the test client's, so a stuck leg is the proxy's clean 504.
    assert proxy.flag("--prefill-timeout") == "60"
    assert proxy.flag("--decode-first-byte-timeout") == "60"
    assert plan.proxy_url == "http://10.0.0.1:18001"


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_instance_commands(plans: dict[str, LaunchPlan], name: str) -> None:
    """Roles, ports, proxy address, READ/WRITE and DP/TP, as vLLM will read them."""
    plan = plans[name]
    scenario = plan.scenario
    for launch, role, dp, tp in [
        *((p, "kv_producer", scenario.prefill_dp, scenario.prefill_tp) for p in plan.prefills),
        (plan.decode, "kv_consumer", scenario.decode_dp, scenario.decode_tp),
    ]:
        env, argv = vllm_argv(launch)
        assert argv[0] == "vllm" and argv[2] == "org/model"
        assert launch.kv_config()["kv_role"] == role  # type: ignore[index]
        assert launch.flag("--data-parallel-size") == str(dp)
        assert launch.flag("--tensor-parallel-size") == str(tp)
        assert launch.flag("--block-size") == "16"
        assert env["HIP_VISIBLE_DEVICES"] == ",".join(map(str, launch.gpus))
        assert len(launch.gpus) == dp * tp
        cfg = extra(launch)
        assert cfg["http_port"] == launch.flag("--port") == str(launch.http_port)
        assert cfg["proxy_ip"] == "10.0.0.1"
        assert cfg["proxy_ping_port"] == plan.proxy.flag("--discovery-port")
        assert cfg["host_ip"] == launch.host == "10.0.0.1"
        assert cfg["backend"] == "rdma"
        if scenario.mode == "READ":
            assert cfg["read_mode"] == "true"
        else:
            assert "read_mode" not in cfg  # WRITE: read_mode omitted
    # One node: every process has its own ports and GPUs.
    taken: list[tuple[str, int, int]] = [("proxy-http", plan.proxy.http_port, 1)]
    taken.append(("proxy-discovery", int(plan.proxy.flag("--discovery-port") or 0), 1))
    gpus: list[int] = []
    for launch in (*plan.prefills, plan.decode):
        cfg, n = extra(launch), len(launch.gpus)
        taken += [
            (f"{launch.name}-http", launch.http_port, 1),
            (f"{launch.name}-handshake", int(cfg["handshake_port"]), n),
            (f"{launch.name}-notify", int(cfg["notify_port"]), n),
        ]
        gpus += launch.gpus
    ports = [p for _, start, n in taken for p in range(start, start + n)]
    assert len(ports) == len(set(ports)), taken
    assert len(gpus) == len(set(gpus)), gpus


def test_modes(plans: dict[str, LaunchPlan]) -> None:
    assert plans["read-1p1d"].scenario.mode == "READ"
    assert plans["write-1p1d"].scenario.mode == "WRITE"
    assert "read_mode" not in extra(plans["write-1p1d"].decode)
    assert extra(plans["read-1p1d"].decode)["read_mode"] == "true"


def test_dp_and_tp_scenarios(plans: dict[str, LaunchPlan]) -> None:
    dp = plans["dp-prefill"]
    assert dp.prefills[0].flag("--data-parallel-size") == "2"
    assert dp.prefills[0].flag("--tensor-parallel-size") == "1"
    assert dp.prefills[0].gpus == (0, 1)
    assert dp.decode.flag("--data-parallel-size") == "1"
    tp = plans["tp"]
    for launch in (tp.prefills[0], tp.decode):
        assert launch.flag("--tensor-parallel-size") == "2"
        assert launch.flag("--data-parallel-size") == "1"
    assert tp.prefills[0].gpus == (0, 1) and tp.decode.gpus == (4, 5)


def test_failover_has_two_prefills_apart(plans: dict[str, LaunchPlan]) -> None:
    plan = plans["prefill-failover"]
    first, second = plan.prefills
    assert (first.name, second.name) == ("prefill", "prefill-2")
    assert first.gpus == (0,) and second.gpus == (1,)
    assert first.http_port != second.http_port
    assert extra(first)["handshake_port"] != extra(second)["handshake_port"]
    assert extra(second)["http_port"] == "18011"
    assert not plan.scenario.compares_to_reference


def test_sizes_come_from_the_settings() -> None:
    settings = settings_for(MORIIO_GPU_DP="4", MORIIO_GPU_TP="8", MORIIO_GPU_MODE="write")
    table = scenarios(settings)
    assert table["dp-prefill"].prefill_dp == 4 and table["dp-prefill"].mode == "WRITE"
    assert table["tp"].prefill_tp == table["tp"].decode_tp == 8
    assert table["read-1p1d"].mode == "READ" and table["write-1p1d"].mode == "WRITE"
    with pytest.raises(NotEnoughGpus, match="needs 8 prefill GPUs"):
        build_plan(table["tp"], settings)  # 4 GPUs per role by default


def test_the_deploy_scripts_refuse_dp_with_tp() -> None:
    """The plan really goes through the scripts: their refusal comes back as a PlanError."""
    bad = Scenario("dp-with-tp", "READ", prefill_dp=2, prefill_tp=2)
    with pytest.raises(PlanError, match="DP>1 with TP>1 collides"):
        build_plan(bad, settings_for())


def test_not_enough_gpus_names_the_variable() -> None:
    settings = settings_for(MORIIO_GPU_PREFILL_GPUS="0")
    table = scenarios(settings)
    build_plan(table["read-1p1d"], settings)  # one GPU is enough there
    for name in ("dp-prefill", "tp", "prefill-failover"):
        with pytest.raises(NotEnoughGpus, match="MORIIO_GPU_PREFILL_GPUS lists 1"):
            build_plan(table[name], settings)


def test_extra_vllm_args_and_nic_reach_every_instance() -> None:
    settings = settings_for(
        MORIIO_GPU_VLLM_ARGS="--max-model-len 4096 --enforce-eager",
        MORI_DEVICE_NIC="mlx5_0",
        MORIIO_GPU_VLLM="/opt/venv/bin/vllm",
        MORIIO_GPU_BLOCK_SIZE="32",
    )
    plan = build_plan(scenarios(settings)["read-1p1d"], settings)
    for launch in (plan.prefills[0], plan.decode):
        assert launch.command[-3:] == ("--max-model-len", "4096", "--enforce-eager")
        assert vllm_argv(launch)[1][0] == "/opt/venv/bin/vllm"
        assert launch.flag("--block-size") == "32"
        assert launch.extra_env == {"MORI_DEVICE_NIC": "mlx5_0"}
        assert launch.environment({})["MORI_DEVICE_NIC"] == "mlx5_0"
    ref = reference_launch(settings, 1)
    assert ref.command[-3:] == ("--max-model-len", "4096", "--enforce-eager")


def test_two_nodes_start_decode_over_ssh() -> None:
    settings = settings_for(
        MORIIO_GPU_DECODE_HOST_IP="10.0.0.2",
        MORIIO_GPU_DECODE_SSH="ops@10.0.0.2",
        MORIIO_GPU_REMOTE_REPO="/srv/moriio-proxy",
        MORIIO_GPU_DECODE_GPUS="0,1,2,3",  # the other node's own GPUs
    )
    plan = build_plan(scenarios(settings)["read-1p1d"], settings)
    decode = plan.decode
    assert extra(decode)["host_ip"] == "10.0.0.2"
    assert extra(decode)["proxy_ip"] == "10.0.0.1"  # heartbeats cross to the proxy's node
    assert decode.gpus == (0,)
    assert extra(plan.prefills[0])["host_ip"] == "10.0.0.1"
    argv = decode.argv()
    assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-tt", "ops@10.0.0.2"]
    remote = argv[5]
    assert remote.startswith("cd /srv/moriio-proxy && env ")
    assert "bash /srv/moriio-proxy/deploy/scripts/decode.sh" in remote
    assert "DECODE_HOST_IP=10.0.0.2" in shlex.split(remote)
    assert plan.prefills[0].argv()[:2] == ["bash", str(SCRIPTS / "prefill.sh")]


def test_bad_settings_name_their_variable() -> None:
    cases = {
        "MORIIO_GPU_DP": "two",
        "MORIIO_GPU_TP": "0",
        "MORIIO_GPU_HOST_IP": "node-a",
        "MORIIO_GPU_PREFILL_GPUS": "0,0",
        "MORIIO_GPU_MODE": "PUSH",
        "MORIIO_GPU_GREEDY_MIN_MATCH": "1.5",
    }
    for name, value in cases.items():
        with pytest.raises(SettingsError, match=name):
            settings_for(**{name: value})
    with pytest.raises(SettingsError, match="MORIIO_GPU_DECODE_SSH"):
        settings_for(MORIIO_GPU_DECODE_HOST_IP="10.0.0.2")


def test_reference_is_plain_vllm_at_decode_tp(plans: dict[str, LaunchPlan]) -> None:
    settings = settings_for()
    ref = reference_launch(settings, plans["tp"].scenario.reference_tp)
    assert ref.script is None and ref.kv_config() is None  # no connector: not disaggregated
    assert ref.command[:2] == ("env", "HIP_VISIBLE_DEVICES=0,1")
    assert ref.flag("--tensor-parallel-size") == "2"
    assert ref.flag("--block-size") == "16"
    assert ref.flag("--port") == str(port_layout(18000)["reference_http"])
    with pytest.raises(NotEnoughGpus):
        reference_launch(settings_for(MORIIO_GPU_PREFILL_GPUS="0"), 2)


def test_clean_environment_drops_what_would_change_the_command() -> None:
    inherited = {
        "PATH": "/usr/bin",
        "HF_TOKEN": "x",
        "MODEL": "other",
        "PREFILL_PORT": "1",
        "KV_EXTRA_CONFIG": "{}",
        "MORIIO_PROXY_MAX_RETRIES": "9",
        "MORIIO_ROLE": "D",
        "MORIIO_GPU_MODEL": "org/model",
    }
    assert clean_environment(inherited) == {
        "PATH": "/usr/bin",
        "HF_TOKEN": "x",
        "MORIIO_GPU_MODEL": "org/model",
    }


def test_the_launch_runs_exactly_the_planned_command(tmp_path: Path) -> None:
    """Running the script for real (with a stand-in vllm) execs the planned argv."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "vllm"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'hip': os.environ.get('HIP_VISIBLE_DEVICES'), "
        "'nic': os.environ.get('MORI_DEVICE_NIC')}))\n"
    )
    fake.chmod(0o755)
    settings = settings_for(MORIIO_GPU_VLLM=str(fake), MORI_DEVICE_NIC="mlx5_1")
    launch = build_plan(scenarios(settings)["tp"], settings).decode
    result = subprocess.run(
        launch.argv(),
        env=launch.environment({"PATH": os.environ["PATH"], "PREFILL_PORT": "1"}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == launch.command_line  # what the runtime compares
    ran = json.loads(record.read_text())
    env, argv = vllm_argv(launch)
    assert ran["argv"] == argv[1:]
    assert ran["hip"] == env["HIP_VISIBLE_DEVICES"] == "4,5"
    assert ran["nic"] == "mlx5_1"


def test_plan_cli_prints_every_scenario() -> None:
    env = {"PATH": os.environ["PATH"], **BASE_ENV, "MORIIO_GPU_PYTHON": sys.executable}
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu.plan"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in SCENARIO_NAMES:
        assert re.search(rf"^{re.escape(name)} \((READ|WRITE)\): ", result.stdout, re.M), name
    assert "deploy/scripts/prefill.sh" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("requirements: ")


# -- skip reasons -------------------------------------------------------------------------


def fake_host(
    root: Path,
    *,
    kfd: bool = True,
    rocm: bool = True,
    nics: tuple[str, ...] = ("mlx5_0",),
) -> Path:
    if kfd:
        (root / "dev").mkdir(parents=True, exist_ok=True)
        (root / "dev" / "kfd").touch()
    if rocm:
        (root / "opt" / "rocm").mkdir(parents=True, exist_ok=True)
    ib = root / "sys" / "class" / "infiniband"
    ib.mkdir(parents=True, exist_ok=True)
    for nic in nics:
        (ib / nic).mkdir()
    return root


def probes(
    root: Path,
    *,
    tools: tuple[str, ...] = ("vllm",),
    mori_error: str | None = None,
    environ: dict[str, str] | None = None,
) -> Probes:
    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in tools else None

    importer: Callable[[str], str | None] = lambda _python: mori_error  # noqa: E731
    return Probes(root=root, which=which, import_mori=importer, environ=environ or {})


def test_nothing_missing_means_no_skip(tmp_path: Path) -> None:
    assert skip_reason(BASE_ENV, probes(fake_host(tmp_path))) is None


def test_bare_machine_names_everything_on_one_line(tmp_path: Path) -> None:
    reason = skip_reason(
        {}, probes(tmp_path, tools=(), mori_error="ModuleNotFoundError: No module named 'mori'")
    )
    assert reason is not None and "\n" not in reason
    assert reason.startswith("GPU P/D suite cannot run here: no /dev/kfd")
    for needle in (
        "no /dev/kfd",
        "no ROCm",
        "no RDMA device under /sys/class/infiniband",
        "no `vllm` executable",
        "`import mori.io` fails",
        "No module named 'mori'",
        "MORIIO_GPU_MODEL unset",
        "tests/gpu/README.md",
    ):
        assert needle in reason, needle


@pytest.mark.parametrize(
    ("host", "kwargs", "env", "needle"),
    [
        ({"kfd": False}, {}, {}, "no /dev/kfd"),
        ({"rocm": False}, {}, {}, "no ROCm"),
        ({"nics": ()}, {}, {}, "no RDMA device under /sys/class/infiniband"),
        ({}, {"mori_error": "ImportError: libionic.so.1"}, {}, "`import mori.io` fails"),
        ({}, {"tools": ()}, {}, "no `vllm` executable"),
        ({}, {}, {"MORIIO_GPU_MODEL": ""}, "MORIIO_GPU_MODEL unset"),
        ({}, {}, {"MORI_DEVICE_NIC": "bnxt_re3"}, "MORI_DEVICE_NIC=bnxt_re3 is not under"),
    ],
)
def test_each_missing_piece_alone(
    tmp_path: Path, host: dict[str, Any], kwargs: dict[str, Any], env: dict[str, str], needle: str
) -> None:
    reason = skip_reason({**BASE_ENV, **env}, probes(fake_host(tmp_path, **host), **kwargs))
    assert reason is not None
    assert needle in reason
    assert reason.count("; ") == 0, reason  # only that one


def test_rocm_found_through_tools_or_rocm_path(tmp_path: Path) -> None:
    root = fake_host(tmp_path, rocm=False)
    assert skip_reason(BASE_ENV, probes(root, tools=("vllm", "amd-smi"))) is None
    (root / "rocm-6.4").mkdir()
    assert skip_reason(BASE_ENV, probes(root, environ={"ROCM_PATH": "/rocm-6.4"})) is None


def test_xgmi_does_not_need_an_rdma_nic(tmp_path: Path) -> None:
    env = {**BASE_ENV, "MORIIO_GPU_BACKEND": "xgmi"}
    assert skip_reason(env, probes(fake_host(tmp_path, nics=()))) is None


def test_the_gpu_tests_skip_here_with_one_reason() -> None:
    """A normal run without the hardware: every GPU test collected, skipped, none errors.

    MORIIO_GPU_MODEL is removed, so this holds even on a GPU node: there, the suite is
    opted into only by setting it.
    """
    env = {k: v for k, v in os.environ.items() if k != "MORIIO_GPU_MODEL"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/gpu/test_pd_gpu.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s", summary), summary
    assert "ERROR" not in result.stdout  # a fixture error would be listed as ERROR
    one_line = [line for line in result.stdout.splitlines() if "GPU tests skipped: " in line]
    assert len(one_line) == 1 and "MORIIO_GPU_MODEL unset" in one_line[0]


def test_env_doc_and_readme_agree() -> None:
    readme = (REPO / "tests" / "gpu" / "README.md").read_text()
    for name in ENV_DOC:
        assert f"`{name}`" in readme, name
    source = "\n".join(
        p.read_text() for p in (REPO / "tests" / "gpu").glob("*.py") if p.name != "test_plan.py"
    )
    read = set(re.findall(r'"((?:MORIIO_GPU|MORI_DEVICE)_[A-Z_]+)"', source))
    assert read <= set(ENV_DOC), read - set(ENV_DOC)


# -- judging a run ------------------------------------------------------------------------


def vllm_metrics(engines: dict[str, dict[str, float]], model: str = "m") -> str:
    """A vLLM-0.32-shaped /metrics page with the per-source prompt token counters."""
    lines = [
        f"# HELP {BY_SOURCE.removesuffix('_total')} Number of prompt tokens by source.",
        f"# TYPE {BY_SOURCE.removesuffix('_total')} counter",
    ]
    for engine, sources in engines.items():
        for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
            value = sources.get(source, 0.0)
            lines.append(
                f'{BY_SOURCE}{{engine="{engine}",model_name="{model}",source="{source}"}} {value}'
            )
    lines += [
        "# HELP vllm:prompt_tokens Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens counter",
    ]
    for engine, sources in engines.items():
        lines.append(
            f'vllm:prompt_tokens_total{{engine="{engine}",model_name="{model}"}} '
            f"{sum(sources.values())}"
        )
    return "\n".join(lines) + "\n"


def test_a_transfer_passes() -> None:
    before = vllm_metrics({"0": {}})
    after = vllm_metrics({"0": {"external_kv_transfer": 3 * 99, "local_compute": 3}})
    decode = kv_evidence(before, after)
    assert (decode.source, decode.external, decode.local_compute) == (BY_SOURCE, 297, 3)
    prefill = kv_evidence(vllm_metrics({"0": {}}), vllm_metrics({"0": {"local_compute": 300}}))
    assert kv_problems(decode, prefill, [100, 100, 100], block_size=16) == []


def test_a_recompute_is_caught() -> None:
    decode = kv_evidence(vllm_metrics({"0": {}}), vllm_metrics({"0": {"local_compute": 300}}))
    problems = kv_problems(decode, None, [100, 100, 100], block_size=16)
    assert len(problems) == 2
    assert "recomputed instead of receiving the KV" in problems[0]
    assert "computed 300 prompt tokens itself" in problems[1]


def test_a_prefill_that_did_not_prefill_is_caught() -> None:
    decode = kv_evidence(vllm_metrics({}), vllm_metrics({"0": {"external_kv_transfer": 300}}))
    prefill = kv_evidence(vllm_metrics({"0": {}}), vllm_metrics({"0": {"local_compute": 2}}))
    (problem,) = kv_problems(decode, prefill, [100, 100, 100], block_size=16)
    assert "prefill computed only 2" in problem


def test_older_metric_and_missing_metrics() -> None:
    older = (
        "# TYPE vllm:external_prefix_cache_hits counter\n"
        "vllm:external_prefix_cache_hits_total 290\n"
    )
    evidence = kv_evidence("", older)
    assert evidence.source == "vllm:external_prefix_cache_hits_total" and evidence.external == 290
    assert kv_problems(evidence, None, [100, 100, 100], 16) == []
    (problem,) = kv_problems(kv_evidence("", "# nothing\n"), None, [100], 16)
    assert "cannot be told from a recompute" in problem


def test_dp_ranks_are_read_per_engine() -> None:
    before = parse_metrics(vllm_metrics({"0": {}, "1": {}}))
    after = parse_metrics(vllm_metrics({"0": {"local_compute": 40}, "1": {"local_compute": 0}}))
    assert delta_by_label(before, after, "vllm:prompt_tokens_total", "engine") == {
        "0": 40.0,
        "1": 0.0,
    }


def test_greedy_comparison() -> None:
    assert greedy_problem(["a b c", "d e"], ["a b c", "d e"], 1.0) is None
    problem = greedy_problem(["Paris is the capital", "x"], ["Paris was the capital", "x"], 1.0)
    assert problem is not None
    assert "1 of 2 greedy answers" in problem and "differs at character 6" in problem
    assert greedy_problem(["a", "b"], ["a", "c"], 0.5) is None


@pytest.mark.parametrize(
    ("status", "body", "error", "kind"),
    [
        (200, {"choices": [{"text": " Paris"}]}, None, "ok"),
        (502, {"error": {"message": "prefill failed", "code": 502}}, None, "clean_error"),
        (None, None, "TimeoutError: timed out", "unclean"),
        (200, {"id": "x"}, None, "unclean"),
        (500, "Internal Server Error", None, "unclean"),
    ],
)
def test_outcome_classification(
    status: int | None, body: Any, error: str | None, kind: str
) -> None:
    assert classify_outcome(status, body, error) == kind


def test_sse_parsing() -> None:
    raw = (
        b'data: {"choices":[{"text":" Pa"}]}\n\n'
        b'data: {"choices":[{"text":"ris"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert parse_sse(raw) == (" Paris", {"prompt_tokens": 5}, True, [])
    _, _, done, errors = parse_sse(b'data: {"error":{"message":"boom"}}\n\ndata: [DONE]\n\n')
    assert done and errors == ["boom"]


def test_settings_replace_keeps_types() -> None:
    settings = replace(settings_for(), model=None)
    with pytest.raises(PlanError, match="MORIIO_GPU_MODEL unset"):
        build_plan(scenarios(settings)["read-1p1d"], settings)
