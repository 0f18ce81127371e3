"""The README's Layout section and docs/architecture.md name what is in the tree.

A module or test tier added without a word in either is how the two drift from the code;
these tests name what is missing.
"""

from __future__ import annotations

import re

import pytest

from tests.harness.imports import PACKAGE_DIR

ROOT = PACKAGE_DIR.parent


def layout() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][\w.]*", text))


def proxy_parts() -> list[str]:
    """Every module and package directly under moriio_proxy/ (entry shims aside)."""
    parts = [p.stem for p in PACKAGE_DIR.glob("*.py") if not p.stem.startswith("__")]
    parts += [p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").exists()]
    return sorted(parts)


@pytest.mark.parametrize("part", proxy_parts())
def test_the_readme_layout_names_every_module(part: str) -> None:
    assert part in words(layout().split("tests/", 1)[0])


def test_the_readme_layout_names_every_test_tier() -> None:
    tiers = sorted(p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists())
    tests_line = layout().split("tests/", 1)[1].split("\nbench/", 1)[0]
    assert [t for t in tiers if f"{t}/" not in tests_line] == []


@pytest.mark.parametrize("part", proxy_parts())
def test_the_architecture_names_every_module(part: str) -> None:
    table = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"`{part}" in table
