"""Where a benchmark's results go: its own folder always, the committed copy on --update.

Every run writes ``<name>.json`` (everything measured) and ``<name>.md`` (the tables) to
its results folder, by default a new one under the git-ignored ``results/scratch/``; only
``--update`` also replaces the committed ``results/<name>.{json,md}``, so a trial run can
never overwrite the figures of record by accident.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def folder(out: Path | None, prefix: str = "") -> Path:
    """``out``, or a new ``results/scratch/<prefix><UTC time>/``; created and announced."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = (out or RESULTS / "scratch" / f"{prefix}{stamp}").resolve()
    path.mkdir(parents=True, exist_ok=True)
    print(f"results folder: {path}", flush=True)
    return path


def write(report: dict[str, Any], text: str, out: Path, name: str, update: bool) -> None:
    """Write the report and its markdown, print the markdown and what was written."""
    payload = json.dumps(report, indent=2) + "\n"
    targets = [out] + ([RESULTS] if update else [])
    written = []
    for folder in targets:
        for suffix, content in ((".json", payload), (".md", text)):
            path = folder / f"{name}{suffix}"
            path.write_text(content)
            written.append(path)
    print(text)
    print("written: " + ", ".join(str(p) for p in written), flush=True)
