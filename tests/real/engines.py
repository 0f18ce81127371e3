"""Real vLLM engine processes for the real-vLLM tier: where the venv is, how one engine is
started, waited for and stopped (tests/real/README.md).

Shared by the two fixtures that start engines: tests/real/conftest.py (connector-less
engines behind the kv shim) and tests/real/kv/conftest.py (engines running vLLM's own
MoRIIOConnector over the mori.io double).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP = "bash scripts/real_vllm/setup.sh"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
BLOCK_SIZE = 32  # vLLM CPU attention: a multiple of 32 (16 fails at start-up)


def _path(env: str, default: Path) -> Path:
    value = os.environ.get(env)
    if not value:
        return default
    path = Path(value)
    return path if path.is_absolute() else REPO / path


VENV = _path("REAL_VLLM_VENV", REPO / ".cache" / "real-vllm" / "venv")
MODEL = _path("REAL_VLLM_MODEL", VENV.parent / "tiny-llama")
MARKER = VENV / ".moriio-real-vllm"  # written by setup.sh once the venv works
REQUIRED = os.environ.get("MORIIO_REAL_VLLM", "").lower() == "required"
START_TIMEOUT = float(os.environ.get("MORIIO_REAL_VLLM_START_TIMEOUT", "300"))


def missing_reason() -> str | None:
    """Why the real tier cannot run here, or None when it can."""
    if not (VENV / "bin" / "python").exists() or not MARKER.exists():
        return f"real vLLM tier not set up ({VENV}): run `{SETUP}`"
    if not (MODEL / "config.json").exists():
        return f"tiny model missing ({MODEL}): run `{SETUP}`"
    return None


class PortTaken(RuntimeError):
    """An engine could not bind a port (another process took it first): try others."""


@dataclass
class Engine:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"


def engine_env(folder: Path, overrides: Mapping[str, str | None] = {}) -> dict[str, str]:
    """The environment of one engine: offline, caches and temp files in ``folder``, one
    OpenMP thread, 1 GiB of KV cache; ``overrides`` sets (or, with None, removes) more."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PYTEST")
    }
    caches = folder / "cache"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache per engine
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
        HF_HOME=str(caches / "hf"),
        VLLM_CACHE_ROOT=str(caches / "vllm"),
        VLLM_CONFIG_ROOT=str(caches / "vllm-config"),
        XDG_CACHE_HOME=str(caches / "xdg"),
        TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
        TRITON_CACHE_DIR=str(caches / "triton"),
        TMPDIR=str(folder / "tmp"),
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def start_engine(
    name: str,
    folder: Path,
    port: int,
    extra: list[str],
    env: Mapping[str, str | None] = {},
) -> Engine:
    """``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails
    on missing package metadata) in its own process group, its output in NAME.log."""
    log = folder / f"{name}.log"
    cmd = [
        str(VENV / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--block-size",
        str(BLOCK_SIZE),
        "--seed",
        "0",
        *extra,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd,
            cwd=folder,
            env=engine_env(folder / name, env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with its workers
        )
    return Engine(name, port, process, log)


def _serves_the_model(engine: Engine) -> bool:
    """Our engine is up (not some other process that happens to hold the port)."""
    try:
        with urllib.request.urlopen(engine.url + "/v1/models", timeout=2) as resp:
            models = json.load(resp)
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return any(m.get("id") == MODEL_NAME for m in models.get("data", []))


def wait_healthy(engines: list[Engine], timeout: float = START_TIMEOUT) -> None:
    """Until every engine serves the model; PortTaken or RuntimeError (with the log's tail)
    when one exits first, RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pending = list(engines)
    while pending:
        for engine in list(pending):
            if not engine.alive():
                tail = engine.tail()
                kind = PortTaken if "address already in use" in tail.lower() else RuntimeError
                raise kind(
                    f"vLLM {engine.name} exited with {engine.process.returncode} during "
                    f"start-up; last lines of {engine.log}:\n{tail}"
                )
            if _serves_the_model(engine):
                pending.remove(engine)
        if pending and time.monotonic() > deadline:
            names = ", ".join(e.name for e in pending)
            tails = "\n".join(f"--- {e.name} ({e.log}):\n{e.tail()}" for e in pending)
            raise RuntimeError(f"vLLM {names} not healthy after {timeout:.0f} s\n{tails}")
        if pending:
            time.sleep(0.5)


def stop_engine(engine: Engine) -> None:
    """SIGTERM to the engine's process group (API server, engine cores, workers), then
    SIGKILL to whatever of that group is still there after 30 s."""
    group = engine.process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine.process.poll()
        try:
            os.killpg(group, 0)  # anyone of the group left?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        engine.process.wait(timeout=10)
