"""Where and on what a benchmark ran: the lines every results file starts with.

A figure is only comparable with another from the same machine, load and code, so every
report says when it ran, on which CPU with how many cores and how busy the machine was
(other work shares it), which commit of moriio-proxy (and whether it had uncommitted
changes) and which versions of the libraries it is built on.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("hypercorn", "quart", "aiohttp")


def git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def when() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine() -> str:
    """CPU, cores and the load average now (the load other work puts on the machine)."""
    cpu_model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return f"{platform.machine()} {cpu_model}, {os.cpu_count()} cores, {load()} at start"


def moriio_proxy() -> str:
    """Version, commit (and whether the tree had changes) and the libraries' versions."""
    from moriio_proxy import __version__

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    libs = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)
    return f"{__version__} at {commit}" + (" (uncommitted changes)" if dirty else "") + f" ({libs})"
