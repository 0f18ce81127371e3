"""The pinned dependency files the images install, against pyproject.toml's ranges.

A dependency added to or changed in pyproject.toml fails here until the locks are
regenerated (``python3.12 docker/update_locks.py``), so the images cannot drift silently.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
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


def image_test_packages() -> tuple[str, ...]:
    """update_locks.py's IMAGE_TEST_PACKAGES, read without running the script."""
    tree = ast.parse((DOCKER / "update_locks.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "IMAGE_TEST_PACKAGES" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("update_locks.py has no IMAGE_TEST_PACKAGES")


@pytest.mark.parametrize("path", [RUNTIME_LOCK, TEST_LOCK], ids=lambda p: p.name)
def test_every_line_is_an_exact_pin(path: Path) -> None:
    assert read_lock(path), f"{path.name} pins nothing"


def test_the_lock_pins_every_runtime_dependency_inside_pyprojects_range() -> None:
    pins = read_lock(RUNTIME_LOCK)
    for text in project()["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {text!r}"
        )


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


def test_the_locks_are_closed_under_their_dependencies() -> None:
    """Every requirement of a pinned package is pinned too, at a version it accepts.

    Needs each package's metadata: it is read from this environment for the packages whose
    installed version is the pinned one (all of them in a venv installed on the day the
    locks were made)."""
    pins = read_lock(RUNTIME_LOCK) | read_lock(TEST_LOCK)
    python = lock_python(RUNTIME_LOCK)
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    checked = 0
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
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
    if checked == 0:
        pytest.skip("no pinned version is installed here: run docker/update_locks.py")
