"""The README's first screen is two commands a newcomer can paste, CI runs the second, and
the settings table names every ``serve`` flag."""

from __future__ import annotations

import re
from pathlib import Path

from moriio_proxy.config import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def first_screen_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "the README opens with no bash block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_first_screen_is_two_commands_demo_then_tests():
    demo, tests = first_screen_commands()
    assert demo == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/moriio-proxy demo"
    )
    assert "[test]" not in demo  # the demo needs the proxy's own dependencies, no more
    assert tests == ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"


def test_ci_runs_the_readme_test_command_in_the_readme_venv():
    demo, tests = first_screen_commands()
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert demo.split(" && ")[0] in ci_lines  # python3 -m venv .venv
    install, pytest = tests.split(" && ")
    assert install in ci_lines
    assert pytest in ci_lines
    assert ci_lines.index(install) < ci_lines.index(pytest)


def test_the_settings_table_names_every_serve_flag():
    rows = set(re.findall(r"^\| `(--[a-z0-9-]+)` \|", README, re.M))
    assert {o.flag for o in OPTIONS} <= rows, {o.flag for o in OPTIONS} - rows
