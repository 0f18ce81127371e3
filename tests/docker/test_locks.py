"""The pinned dependency files the images install, against pyproject.toml's ranges.

A dependency added to or changed in pyproject.toml (``[project].dependencies``, the extras
the images carry, the image's test runner) fails here until the locks are regenerated
(``python3.12 docker/update_locks.py``), so the images cannot drift silently.
"""

from __future__ import annotations

import ast
import importlib.metadata
import itertools
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.docker.support import DOCKER, PROXY, ROOT, parse_dockerfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

RUNTIME_LOCK = DOCKER / "requirements.lock"
TEST_LOCK = DOCKER / "requirements-test.lock"
PIN = re.compile(r"([a-z0-9]+(?:-[a-z0-9]+)*)==([A-Za-z0-9.+!-]+)")


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.fullmatch(line)
        assert match, f"{path.name}:{number}: not a canonical name==version pin: {line!r}"
        name, version = match.groups()
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = version
    return pins


def lock_python(path: Path) -> str:
    match = re.search(r"^# Resolved for CPython (\d+\.\d+) ", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} does not say which Python it was resolved for"
    return match.group(1)


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def update_locks_constant(name: str) -> tuple[str, ...]:
    """A constant of update_locks.py, read without running the script."""
    tree = ast.parse((DOCKER / "update_locks.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"update_locks.py has no {name}")


def image_test_packages() -> tuple[str, ...]:
    return update_locks_constant("IMAGE_TEST_PACKAGES")


def image_extras() -> tuple[str, ...]:
    """The extras whose packages requirements.lock pins beside the runtime dependencies."""
    return update_locks_constant("IMAGE_EXTRAS")


def runtime_groups() -> list[str]:
    """What requirements.lock must satisfy: ``dependencies`` and each image extra."""
    return ["dependencies", *(f"[{extra}]" for extra in image_extras())]


def requirements_of(group: str) -> list[str]:
    if group == "dependencies":
        return list(project()["dependencies"])
    return list(project()["optional-dependencies"][group.strip("[]")])


@pytest.mark.parametrize("path", [RUNTIME_LOCK, TEST_LOCK], ids=lambda p: p.name)
def test_every_line_is_an_exact_pin(path: Path) -> None:
    assert read_lock(path), f"{path.name} pins nothing"


# The images' interpreter and platform, for which the locks are resolved (their header).
LOCK_TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.1",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "os_name": "posix",
}


@pytest.mark.parametrize("group", runtime_groups())
def test_the_lock_pins_every_runtime_requirement_inside_pyprojects_range(group: str) -> None:
    pins = read_lock(RUNTIME_LOCK)
    requirements = requirements_of(group)
    assert requirements, f"pyproject's {group} is empty"
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(LOCK_TARGET):
            continue  # e.g. async-timeout, only for Python < 3.11: not in a 3.12 image
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject's {group} but not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {text!r}"
        )


def kubernetes_discovery_args() -> list[list[str]]:
    """The args of every container in deploy/kubernetes that runs ``--discovery kubernetes``."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            args = node.get("args")
            if isinstance(args, list) and any(
                a == "--discovery" and b == "kubernetes" for a, b in itertools.pairwise(args)
            ):
                found.append(args)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((ROOT / "deploy" / "kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            walk(document)
    return found


def test_the_images_carry_the_k8s_extra_the_manifests_need() -> None:
    # The kubernetes-discovery component runs the proxy image with --discovery kubernetes,
    # which imports kubernetes-asyncio: pyproject's [k8s] extra.
    assert kubernetes_discovery_args(), "no manifest runs --discovery kubernetes any more"
    assert "k8s" in project()["optional-dependencies"], "pyproject lost its [k8s] extra"
    assert "k8s" in image_extras(), "requirements.lock must pin the [k8s] extra"
    pins = read_lock(RUNTIME_LOCK)
    assert "kubernetes-asyncio" in pins
    assert "kubernetes-asyncio" not in read_lock(TEST_LOCK)


def test_the_test_lock_pins_the_images_test_runner_inside_pyprojects_range() -> None:
    pins = read_lock(TEST_LOCK)
    wanted = image_test_packages()
    ranges = {
        canonicalize_name(Requirement(t).name): t
        for t in project()["optional-dependencies"]["test"]
    }
    for name in wanted:
        assert name in ranges, f"{name} left pyproject's [test] extra"
        assert name in pins, f"{name} is not in requirements-test.lock"
        assert Requirement(ranges[name]).specifier.contains(pins[name], prereleases=True)


def test_the_locks_are_disjoint_and_never_pin_the_proxy_itself() -> None:
    runtime, test = read_lock(RUNTIME_LOCK), read_lock(TEST_LOCK)
    assert not set(runtime) & set(test)
    assert "moriio-proxy" not in set(runtime) | set(test)


def test_the_locks_were_resolved_for_the_images_python() -> None:
    image = parse_dockerfile(PROXY).global_args["PYTHON_IMAGE"] or ""
    match = re.fullmatch(r"python:(\d+\.\d+)-slim.*", image)
    assert match, image
    assert lock_python(RUNTIME_LOCK) == lock_python(TEST_LOCK) == match.group(1)


def pinned_requirements(name: str, pins: dict[str, str], python: str) -> list[str] | None:
    """The requirements of ``name`` at its pinned version that apply on the lock's Python,
    checked to be pinned inside their ranges; None if this environment lacks that version.

    The metadata is read from this environment, which has it for the packages whose installed
    version is the pinned one (all of them in a venv installed on the day the locks were
    made)."""
    version = pins[name]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    needs = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker or Marker("python_version > '0'")
        if not marker.evaluate(environment):
            continue
        needed = canonicalize_name(requirement.name)
        assert needed in pins, f"{name}=={version} needs {text!r}, which no lock pins"
        assert requirement.specifier.contains(pins[needed], prereleases=True), (
            f"{name}=={version} needs {text!r}; the lock has {needed}=={pins[needed]}"
        )
        needs.append(needed)
    return needs


def test_the_locks_are_closed_under_their_dependencies() -> None:
    """Every requirement of a pinned package is pinned too, at a version it accepts."""
    pins = read_lock(RUNTIME_LOCK) | read_lock(TEST_LOCK)
    python = lock_python(RUNTIME_LOCK)
    checked = [n for n in pins if pinned_requirements(n, pins, python) is not None]
    if not checked:
        pytest.skip("no pinned version is installed here: run docker/update_locks.py")


@pytest.mark.parametrize("extra", image_extras())
def test_the_runtime_lock_holds_each_image_extras_whole_closure(extra: str) -> None:
    """From the extra's own packages, every package they pull in, transitively, is pinned in
    requirements.lock (not only in the test lock), at a version its dependents accept."""
    pins = read_lock(RUNTIME_LOCK)
    python = lock_python(RUNTIME_LOCK)
    todo = [canonicalize_name(Requirement(t).name) for t in requirements_of(f"[{extra}]")]
    seen: set[str] = set()
    unread: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"[{extra}] pulls in {name}, which requirements.lock does not pin"
        needs = pinned_requirements(name, pins, python)
        if needs is None:
            unread.append(f"{name}=={pins[name]}")
        else:
            todo += needs
    if unread:
        pytest.skip(f"not installed here at the pinned version: {', '.join(sorted(unread))}")
