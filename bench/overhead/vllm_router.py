"""Finding (or installing) vllm-router, the comparison target, outside the project's venv.

vllm-router comes from PyPI with its own pinned dependencies (FastAPI, uvicorn, ...), so it
lives in a venv of its own under the user's cache, never in the repository or in the venv
the proxy is tested in.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from bench import options

CACHE_VENV = Path.home() / ".cache" / "moriio-proxy" / "bench" / "vllm-router-venv"
# The launch flags here were checked against this release; --vllm-router-spec overrides.
DEFAULT_SPEC = "vllm-router==0.1.17"


@dataclass(frozen=True)
class Located:
    binary: str | None
    how: str  # where it came from, or why there is none


def install(spec: str, where: Path = CACHE_VENV) -> str:
    """pip-install ``spec`` into a venv at ``where`` (created if needed); return the binary."""
    binary = where / "bin" / "vllm-router"
    if not (where / "bin" / "python").exists():
        print(f"creating {where} for vllm-router", flush=True)
        venv.EnvBuilder(with_pip=True).create(where)
    print(f"installing {spec} into {where}", flush=True)
    subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", spec], check=True
    )
    if not binary.exists():
        raise FileNotFoundError(f"{spec} installed no {binary}")
    return str(binary)


def locate(explicit: str | None) -> Located:
    """--vllm-router PATH (checked by ``check_arguments`` as the options were parsed), else
    the cached venv, else PATH; otherwise why not."""
    if explicit:
        return Located(shutil.which(explicit) or explicit, f"--vllm-router {explicit}")
    cached = CACHE_VENV / "bin" / "vllm-router"
    if cached.exists():
        return Located(str(cached), f"the benchmark's venv {CACHE_VENV}")
    on_path = shutil.which("vllm-router")
    if on_path:
        return Located(on_path, "PATH")
    return Located(
        None,
        "vllm-router not found (no --vllm-router PATH, nothing in "
        f"{CACHE_VENV}, none on PATH); --install-vllm-router installs {DEFAULT_SPEC} there",
    )


def version(binary: str) -> str:
    """The installed distribution's version, asked of the Python its launcher runs on."""
    try:
        first = Path(binary).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return "unknown"
    python = first[2:].strip() if first.startswith("#!") else sys.executable
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('vllm-router'))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark that runs vllm-router takes."""
    parser.add_argument("--vllm-router", metavar="PATH", help="vllm-router launcher to use")
    parser.add_argument(
        "--install-vllm-router",
        action="store_true",
        help=f"pip-install it into {CACHE_VENV} first",
    )
    parser.add_argument(
        "--vllm-router-spec", default=DEFAULT_SPEC, help="what --install-vllm-router installs"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A ``--vllm-router`` that is not an executable ends the run before any work."""
    if args.vllm_router:
        options.check_executable(parser, "--vllm-router", args.vllm_router)


def find(args: argparse.Namespace, wanted: bool, why_not: str) -> Located:
    """The launcher the options name (installed first if asked), or why there is none.

    ``wanted`` False: vllm-router is not part of this run (``why_not`` says so). When it
    is wanted and not found, a banner says so at once: the results list it as skipped.
    """
    if not wanted:
        return Located(None, why_not)
    if args.install_vllm_router:
        install(args.vllm_router_spec)
    located = locate(args.vllm_router)
    if located.binary is None:
        banner = "#" * 78
        print(f"{banner}\n# vllm-router SKIPPED: {located.how}\n{banner}", flush=True)
    return located


def describe(located: Located) -> str:
    """Its version and where it came from, for the results' header."""
    if located.binary is None:
        return "not run"
    return f"{version(located.binary)} ({located.how})"
