"""What each module of moriio_proxy imports, read from its source (no import executed).

Relative imports are resolved against the module's package; imports inside functions and
``if TYPE_CHECKING:`` blocks count too, since they are dependencies all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moriio_proxy

PACKAGE_DIR = Path(moriio_proxy.__file__).parent
ROOT = "moriio_proxy"


def module_name(path: Path) -> str:
    """``moriio_proxy/discovery/zmq.py`` -> ``moriio_proxy.discovery.zmq`` (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path) -> str:
    """The dotted package a module's relative imports start from."""
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    return ".".join(rel.parts[:-1])  # a module's package; __init__'s package is its own dir


def imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
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
            if base == ROOT or (node.level and not node.module):
                out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            else:
                out.append((node.lineno, base))
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in the module at ``path``."""
    return imported(ast.parse(path.read_text(encoding="utf-8")), package_of(path))


def within(name: str, prefix: str) -> bool:
    """True if module ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def modules(under: Path = PACKAGE_DIR) -> list[Path]:
    return sorted(under.rglob("*.py"))
