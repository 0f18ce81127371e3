"""What every benchmark's results say about the run: when, on what machine, which commit."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """``git args`` in the repository, or "" when git is not there to ask."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def commit() -> str:
    """The short commit, marked when the working tree has uncommitted changes."""
    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" (uncommitted changes)" if dirty else "")


def machine() -> str:
    cpu_model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (
        f"{platform.machine()} {cpu_model}, {os.cpu_count()} cores, "
        f"load average {load[0]:.2f} at start"
    )


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command(script: str) -> str:
    """How this run was started, to paste."""
    return f"python bench/{script} " + shlex.join(sys.argv[1:])
