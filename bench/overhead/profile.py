"""py-spy on the proxy during one cell, boiled down to the functions that cost most.

Own time (samples where a function is the innermost frame) says where the CPU goes; total
time (samples where it is anywhere on the stack) says which call paths hold it. Both, for
the top N, go to the results so a profile before a change and one after can be compared
line by line; the raw py-spy output is kept beside them for flame graphs.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# py-spy's raw frames: "function (path/to/file.py:LINE)"; with --function LINE is the def.
_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy(install: bool = True) -> str:
    """The py-spy beside this Python (installed into its venv when missing), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    if not install:
        raise FileNotFoundError("py-spy not found: pip install py-spy")
    print(f"installing py-spy into {sys.prefix} (for --profile)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(beside)


def start(binary: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Record ``pid`` and its subprocesses for ``seconds`` into ``out`` (py-spy's raw format).

    Sampling pauses the process for each stack read (py-spy's default, exact stacks), so
    the profiled pass is run apart from the measured one.
    """
    args = [
        binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
        "--duration", str(max(1, round(seconds))), "--function", "--subprocesses",
    ]  # fmt: skip
    log = out.with_suffix(".log").open("wb")
    try:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _frame(text: str) -> str:
    match = _FRAME_RE.match(text)
    if match is None:
        return text
    path = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path}{':' + match['line'] if match['line'] else ''})"


def summarize(raw: Path, top: int) -> dict[str, Any]:
    """Top ``top`` functions by own samples, with their total samples, from a raw file."""
    return summarize_text(raw.read_text(errors="replace"), top)


def summarize_text(text: str, top: int) -> dict[str, Any]:
    """``summarize`` of a raw profile's text."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    rows = [
        {
            "function": name,
            "own_samples": n,
            "own_pct": round(100 * n / samples, 1) if samples else 0.0,
            "total_pct": round(100 * total[name] / samples, 1) if samples else 0.0,
        }
        for name, n in own.most_common(top)
    ]
    return {"samples": samples, "top_own": rows}
