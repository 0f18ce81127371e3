"""What every benchmark's results say about the run: when, on what machine, which commit."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def load() -> str:
    """The load average now: other work shares this machine, and a figure measured under
    load is only comparable with one measured under the same load."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine() -> str:
    """CPU, cores and the load average at the start of the run."""
    cpu_model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return f"{platform.machine()} {cpu_model}, {os.cpu_count()} cores, {load()} at start"


LIBRARIES = ("hypercorn", "quart", "aiohttp")


def moriio_proxy() -> str:
    """Version, commit (and whether the tree had changes) and the serving libraries' versions."""
    from moriio_proxy import __version__

    libs = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)
    return f"{__version__} at {commit()} ({libs})"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command(script: str) -> str:
    """How this run was started, to paste."""
    return f"python bench/{script} " + shlex.join(sys.argv[1:])


RESULTS = ROOT / "bench" / "results"


def results_folder(chosen: Path | None, prefix: str = "") -> Path:
    """``chosen``, or a new git-ignored ``results/scratch/<prefix><UTC time>`` folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = (chosen or RESULTS / "scratch" / f"{prefix}{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"results folder: {out}", flush=True)
    return out


def write_results(out: Path, stem: str, report: dict[str, Any], text: str, update: bool) -> None:
    """``<stem>.json`` and ``<stem>.md`` into ``out``, and with ``update`` into the committed
    ``bench/results`` too; prints the markdown and where it all went."""
    payload = json.dumps(report, indent=2) + "\n"
    folders = [out, RESULTS] if update else [out]
    written = []
    for folder in folders:
        for suffix, content in ((".json", payload), (".md", text)):
            path = folder / f"{stem}{suffix}"
            path.write_text(content)
            written.append(path)
    print(text)
    print("written: " + ", ".join(str(p) for p in written), flush=True)
