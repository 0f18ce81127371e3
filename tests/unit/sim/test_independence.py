"""The simulator is an independent reading of vLLM: it must not import the proxy it tests.

If ``moriio_proxy.sim`` shared code with the proxy, a misunderstanding of vLLM in that code
would be mirrored on both sides and every test would still pass. This test parses each module
of the package and fails on any import that resolves into ``moriio_proxy`` outside
``moriio_proxy.sim`` (relative imports that climb out of the package included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness.imports import PACKAGE_DIR, ROOT, imported, imports_of, modules

SIM_DIR = PACKAGE_DIR / "sim"
ALLOWED = "moriio_proxy.sim"


def _is_foreign(name: str) -> bool:
    if name.startswith("."):
        return True
    in_root = name == ROOT or name.startswith(ROOT + ".")
    in_sim = name == ALLOWED or name.startswith(ALLOWED + ".")
    return in_root and not in_sim


def foreign_imports(source: str, package: str) -> list[str]:
    """``line: module`` for each import of the proxy outside the simulator package."""
    return [
        f"{line}: {name}"
        for line, name in imported(ast.parse(source), package)
        if _is_foreign(name)
    ]


def sim_modules() -> list[Path]:
    return modules(SIM_DIR)


def test_the_package_has_modules() -> None:
    assert len(sim_modules()) > 1


@pytest.mark.parametrize("path", sim_modules(), ids=lambda p: str(p.relative_to(SIM_DIR)))
def test_sim_imports_nothing_from_the_proxy(path: Path) -> None:
    found = [f"{line}: {name}" for line, name in imports_of(path) if _is_foreign(name)]
    assert not found, f"{path} imports the proxy: {found}"


@pytest.mark.parametrize(
    ("source", "package", "bad"),
    [
        ("import moriio_proxy.config", "moriio_proxy.sim", True),
        ("from moriio_proxy.protocol import Instance", "moriio_proxy.sim", True),
        ("from moriio_proxy import registry", "moriio_proxy.sim", True),
        ("import moriio_proxy", "moriio_proxy.sim", True),
        ("from ..config import load_config", "moriio_proxy.sim", True),
        ("from .. import app", "moriio_proxy.sim", True),
        ("from ...disagg import x", "moriio_proxy.sim.engine", True),
        ("from .... import x", "moriio_proxy.sim", True),
        ("from .model import expected_text", "moriio_proxy.sim", False),
        ("from ..settings import SimConfig", "moriio_proxy.sim.engine", False),
        ("from . import model", "moriio_proxy.sim", False),
        ("from moriio_proxy.sim.model import kv_fingerprint", "moriio_proxy.sim", False),
        ("from moriio_proxy import sim", "moriio_proxy.sim", False),
        ("import zmq.asyncio\nfrom aiohttp import web", "moriio_proxy.sim", False),
    ],
)
def test_the_check_tells_foreign_imports_apart(source: str, package: str, bad: bool) -> None:
    assert bool(foreign_imports(source, package)) is bad
