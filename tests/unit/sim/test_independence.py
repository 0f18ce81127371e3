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

import moriio_proxy.sim

SIM_DIR = Path(moriio_proxy.sim.__file__).parent
ROOT = "moriio_proxy"
ALLOWED = "moriio_proxy.sim"


def _package_of(path: Path) -> str:
    """The dotted package a module's relative imports start from."""
    rel = path.relative_to(SIM_DIR.parent.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1])  # a module's package; __init__'s package is its own dir


def _imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every module an import statement in ``tree`` loads.

    ``from moriio_proxy import x`` loads ``moriio_proxy.x`` (judged by ``x``); a relative
    import is resolved against ``package``, and one climbing above the top-level package is
    returned with its leading dots.
    """
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            climb = max(node.level - 1, 0)
            if climb >= len(parts):
                out.append((node.lineno, "." * node.level + (node.module or "")))
                continue
            base = ".".join(parts[: len(parts) - climb]) if node.level else ""
            base = ".".join(p for p in (base, node.module or "") if p)
            if base == ROOT:
                out.extend((node.lineno, f"{ROOT}.{alias.name}") for alias in node.names)
            else:
                out.append((node.lineno, base))
    return out


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
        for line, name in _imported(ast.parse(source), package)
        if _is_foreign(name)
    ]


def sim_modules() -> list[Path]:
    return sorted(SIM_DIR.rglob("*.py"))


def test_the_package_has_modules() -> None:
    assert len(sim_modules()) > 1


@pytest.mark.parametrize("path", sim_modules(), ids=lambda p: str(p.relative_to(SIM_DIR)))
def test_sim_imports_nothing_from_the_proxy(path: Path) -> None:
    found = foreign_imports(path.read_text(encoding="utf-8"), _package_of(path))
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
