"""The path options the benchmarks take, checked before any work starts.

A benchmark runs for minutes and starts processes: a mistyped path found on the way
would end it in a traceback, after work and possibly a half-written results folder. Each
check here ends the run at once with one line on stderr and exit status 2, argparse's
status for a bad option.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import NoReturn


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """``prog: error: message`` and exit 2 (argparse's own error adds the usage lines)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def check_executable(parser: argparse.ArgumentParser, option: str, value: str) -> str:
    """``value`` as a path (or a name on PATH) of an executable file, resolved."""
    path = shutil.which(value) or value
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        fail(parser, f"{option} {value}: not an executable file")
    return path


def check_file(parser: argparse.ArgumentParser, option: str, value: str, suffix: str) -> Path:
    """``value`` as an existing file whose name ends in ``suffix``."""
    path = Path(value)
    if not path.is_file():
        fail(parser, f"{option} {value}: no such file")
    if path.suffix != suffix:
        fail(parser, f"{option} {value}: not a {suffix} file")
    return path


def add_results_options(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out`` and ``--update``, as every benchmark that writes ``results/<name>.*`` has them."""
    parser.add_argument("--out", type=Path, help="results folder (default: a new scratch one)")
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"also write the committed bench/results/{name}.{{json,md}}",
    )


def add_proxy_arg(parser: argparse.ArgumentParser) -> None:
    """``--proxy-arg``: extra ``moriio-proxy serve`` arguments for the proxy under test."""
    parser.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra moriio-proxy serve argument (repeatable), e.g. --proxy-arg=--log-level=warning",
    )


def check_out(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """``--out``: a folder, made now (it is where the results go) if it is not there."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(parser, f"--out {out}: cannot make the folder ({exc.strerror or exc})")
