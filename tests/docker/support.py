"""Shared helpers for the image tests: paths, the linters' executables, a Dockerfile model."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCRIPT = DOCKER / "install_nic_backend.sh"
ROCM = DOCKER / "Dockerfile.rocm"
PROXY = DOCKER / "Dockerfile.proxy"


def dockerfiles() -> list[Path]:
    """Every Dockerfile under docker/ (not the per-Dockerfile .dockerignore files)."""
    return sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")


def executable(name: str, package: str) -> str:
    """A tool from the test venv (where its PyPI package puts it), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: pip install {package} (pyproject's [test] extra)")
    return found


@dataclass
class Instruction:
    name: str  # upper case: RUN, COPY, ...
    value: str  # continuation lines joined, variables left as written
    line: int  # 1-based

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD/ENTRYPOINT (for HEALTHCHECK: of its CMD part)."""
        text = self.value
        if self.name == "HEALTHCHECK":
            text = text[text.index("CMD") + len("CMD") :]
        words = json.loads(text)
        assert isinstance(words, list), f"line {self.line}: {self.name} not in exec form"
        return words


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        """The instruction that counts (the last of its kind in the stage)."""
        found = self.all(name)
        assert found, f"stage {self.name}: no {name}"
        return found[-1]

    def index(self, predicate: Callable[[Instruction], bool]) -> int:
        for i, instruction in enumerate(self.instructions):
            if predicate(instruction):
                return i
        raise AssertionError(f"stage {self.name}: no such instruction")

    def declares_before(self, arg: str, position: int) -> bool:
        """A build ARG reaches an instruction only if the stage declares it before that."""
        return any(
            i.name == "ARG" and i.value.split("=")[0] == arg for i in self.instructions[:position]
        )

    def copies(self) -> list[tuple[list[str], str, Instruction]]:
        """(sources, destination, instruction) of each COPY from the build context."""
        result = []
        for copy in self.all("COPY"):
            words = shlex.split(copy.value)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            result.append((words[:-1], words[-1], copy))
        return result


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage named {name!r}")


def parse_dockerfile(path: Path) -> Dockerfile:
    with path.open("rb") as f:
        structure = DockerfileParser(fileobj=f, env_replace=False).structure
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for item in structure:
        name = item["instruction"].upper()
        if name == "COMMENT":
            continue
        instruction = Instruction(name, item["value"].strip(), item["startline"] + 1)
        if name == "FROM":
            words = instruction.value.split()
            base = words[0]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(alias, base))
        elif not stages:
            assert name == "ARG", f"line {instruction.line}: only ARG may precede FROM"
            key, _, default = instruction.value.partition("=")
            global_args[key] = default if "=" in instruction.value else None
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)
