"""The direction of dependencies inside moriio_proxy, read from the source of every module.

app -> completions/disagg -> policies/upstream/relay/protocol; discovery -> registry ->
protocol. A lower layer that imported a higher one would tie the request path to the web
framework (or discovery to the request path) and make cycles a matter of time; see
docs/architecture.md. The simulator's own rule (it imports nothing of the proxy) is in
tests/unit/sim/test_independence.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.imports import PACKAGE_DIR, imports_of, module_name, modules, within

# The process entry points: the only modules that build the app.
ENTRY_POINTS = ("moriio_proxy.cli", "moriio_proxy.workers")

# Above the request path: whatever builds, serves or runs the proxy.
_ASSEMBLY = (
    "moriio_proxy.app",
    "moriio_proxy.state",
    "moriio_proxy.server",
    "moriio_proxy.cli",
    "moriio_proxy.workers",
)
_REQUEST_PATH = ("moriio_proxy.completions", "moriio_proxy.disagg", "moriio_proxy.attempt")

# importer (a module or package) -> what it must not import, and why.
RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "moriio_proxy.protocol": (("moriio_proxy",), "the wire contract is pure"),
    "moriio_proxy.registry": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery", "moriio_proxy.policies"),
        "the registry knows instances, not how they are found or chosen",
    ),
    "moriio_proxy.policies": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery", "moriio_proxy.upstream"),
        "a policy chooses among registry entries and knows nothing else",
    ),
    "moriio_proxy.upstream": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery", "moriio_proxy.relay"),
        "upstream speaks HTTP to instances for whoever calls it",
    ),
    "moriio_proxy.relay": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery"),
        "the relay rewrites what it is handed",
    ),
    "moriio_proxy.disagg": (
        (*_ASSEMBLY, "moriio_proxy.completions", "moriio_proxy.discovery"),
        "one request's P/D flow does not know how it is served or how instances are found",
    ),
    "moriio_proxy.attempt": (
        (*_ASSEMBLY, "moriio_proxy.completions", "moriio_proxy.disagg", "moriio_proxy.discovery"),
        "one attempt's legs know neither the retries around them nor how they are served",
    ),
    "moriio_proxy.answer": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery"),
        "what a request ends as is a plain type the request path hands up",
    ),
    "moriio_proxy.completions": (
        ("moriio_proxy.app", "moriio_proxy.server", "moriio_proxy.cli", "moriio_proxy.workers"),
        "the ASGI fast path is mounted by the app, not the other way round",
    ),
    "moriio_proxy.discovery": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.policies", "moriio_proxy.upstream"),
        "discovery feeds the registry and nothing else",
    ),
    "moriio_proxy.admin.actions": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.discovery", "moriio_proxy.upstream"),
        "an operator's action changes the registry; discovery and the app call it",
    ),
    "moriio_proxy.admin.command": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.registry", "moriio_proxy.discovery"),
        "moriio-proxy admin is a client: it talks to a proxy over HTTP",
    ),
    "moriio_proxy.check": (
        (*_ASSEMBLY, *_REQUEST_PATH, "moriio_proxy.registry", "moriio_proxy.discovery"),
        "check is a client: it reads a proxy over HTTP, sharing only the wire shapes",
    ),
}


def violations(path: Path) -> list[str]:
    """Each import of the module at ``path`` that breaks a rule, with the rule's reason."""
    name = module_name(path)
    found = []
    for line, target in imports_of(path):
        if within(target, "moriio_proxy.app") and name not in ENTRY_POINTS:
            found.append(f"line {line}: {target} (only {', '.join(ENTRY_POINTS)} build the app)")
        if within(target, "moriio_proxy.testing"):
            found.append(f"line {line}: {target} (testing.py is for tests and bench only)")
        for importer, (forbidden, why) in RULES.items():
            if within(name, importer) and not within(target, importer):
                found.extend(
                    f"line {line}: {target} ({why})" for f in forbidden if within(target, f)
                )
    return found


PROXY_MODULES = [p for p in modules() if not within(module_name(p), "moriio_proxy.sim")]


@pytest.mark.parametrize("path", PROXY_MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_point_down(path: Path) -> None:
    assert violations(path) == []


def test_every_rule_names_modules_that_exist() -> None:
    names = {module_name(p) for p in modules()}
    mentioned = {*RULES, *ENTRY_POINTS, *(f for forbidden, _ in RULES.values() for f in forbidden)}
    assert {m for m in mentioned if not any(within(n, m) for n in names)} == set()


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("policies/session.py", "from ..disagg import Disaggregator", True),
        ("policies/session.py", "from ..registry import Entry", False),
        ("discovery/zmq.py", "from ..app import create_app", True),
        ("discovery/kubernetes/source.py", "from ...disagg import x", True),
        ("discovery/zmq.py", "from .base import DiscoverySource", False),
        ("relay.py", "import moriio_proxy.completions", True),
        ("protocol.py", "from .compat import timeout_after", True),
        ("state.py", "from .app import state", True),
        ("cli.py", "from .app import create_app", False),
        ("disagg.py", "from moriio_proxy import testing", True),
    ],
)
def test_the_rules_tell_imports_apart(
    module: str, source: str, bad: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_root = tmp_path / "moriio_proxy"
    path = fake_root / module
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n", encoding="utf-8")
    monkeypatch.setattr("tests.harness.imports.PACKAGE_DIR", fake_root)
    assert bool(violations(path)) is bad
