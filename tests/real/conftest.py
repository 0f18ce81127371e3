"""Real vLLM (the CPU build from PyPI) behind the proxy: fixtures of the ``real_vllm`` tier.

One prefill engine (``--data-parallel-size 2``, so the proxy's X-data-parallel-rank is
judged by a real engine) and one decode engine run for all of tests/real, from the
separate venv that ``scripts/real_vllm/setup.sh`` builds. Each test gets its own proxy
(in-process, tests/harness.py), a kv shim in front of the prefill engine and a recorder in
front of the decode engine (tests/real/kv_shim.py explains why and what they do).

Without the venv the tier skips with one line, unless ``MORIIO_REAL_VLLM=required`` (CI):
then it fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moriio_proxy.protocol import Instance
from tests.harness import RunningProxy, free_port, running_proxy
from tests.real.kv_shim import Producer, Shim

REPO = Path(__file__).resolve().parents[2]
SETUP = "bash scripts/real_vllm/setup.sh"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
BLOCK_SIZE = 32  # vLLM CPU attention: a multiple of 32 (16 fails at start-up)
PREFILL_DP = 2
# The MoRI-IO side of each instance as it would announce itself (nothing listens there:
# the engines run without the connector; the proxy only puts these in the legs).
PREFILL_KV = Producer("127.0.0.1", 6301, 6105, dp_size=PREFILL_DP, block_size=BLOCK_SIZE)
DECODE_KV = ("127.0.0.1", 7301, 7501)


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line when the tier skipped, even without ``-rs`` (as tests/gpu does)."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3 and f"`{SETUP}`" in longrepr[2]:
            reasons.append(longrepr[2].removeprefix("Skipped: "))
    if reasons:
        terminalreporter.write_line(f"real vLLM tests skipped ({len(reasons)}): {reasons[0]}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_vllm: runs real vLLM (CPU build, separate venv: scripts/real_vllm/)"
    )


@dataclass
class Engine:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Engines:
    prefill: Engine
    decode: Engine
    model: str = MODEL_NAME
    max_model_len: int = MAX_MODEL_LEN


def _engine_env(folder: Path) -> dict[str, str]:
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
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def _start(name: str, folder: Path, port: int, extra: list[str]) -> Engine:
    log = folder / f"{name}.log"
    cmd = [
        str(VENV / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",  # the `vllm` script lacks package metadata
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
            env=_engine_env(folder / name),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with its workers
        )
    return Engine(name, port, process, log)


class PortTaken(RuntimeError):
    """An engine could not bind its port (another process took it first): try others."""


def _serves_the_model(engine: Engine) -> bool:
    """Our engine is up (not some other process that happens to hold the port)."""
    try:
        with urllib.request.urlopen(engine.url + "/v1/models", timeout=2) as resp:
            models = json.load(resp)
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return any(m.get("id") == MODEL_NAME for m in models.get("data", []))


def _wait_healthy(engines: list[Engine], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(engines)
    while pending:
        for engine in list(pending):
            if engine.process.poll() is not None:
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


def _stop(engine: Engine) -> None:
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


@pytest.fixture(scope="package")  # stopped once tests/real is done, not at session end
def real_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    reason = missing_reason()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"MORIIO_REAL_VLLM=required but {reason}", pytrace=False)
        pytest.skip(reason)
    began = time.monotonic()
    for attempt in range(3):
        folder = tmp_path_factory.mktemp("real-vllm")
        # Below the ephemeral range (vLLM's own internal ports come from there), from a
        # random start so that concurrent runs on one machine rarely race for a port.
        prefill_port = free_port(random.randrange(22000, 31000))
        decode_port = free_port(prefill_port + 1)
        rpc_port = free_port(decode_port + 1)
        dp_args = ["--data-parallel-size", str(PREFILL_DP)]
        dp_args += ["--data-parallel-rpc-port", str(rpc_port)]
        started = [
            _start("prefill", folder, prefill_port, dp_args),
            _start("decode", folder, decode_port, []),
        ]
        try:
            _wait_healthy(started, START_TIMEOUT)
        except BaseException as exc:  # also Ctrl-C: never leave engines behind
            for engine in started:
                _stop(engine)
            if isinstance(exc, PortTaken) and attempt < 2:
                continue
            if isinstance(exc, RuntimeError):
                pytest.fail(str(exc), pytrace=False)
            raise
        break
    print(f"\nreal vLLM engines up after {time.monotonic() - began:.1f} s ({folder})")
    try:
        yield Engines(prefill=started[0], decode=started[1])
    finally:
        for engine in started:
            _stop(engine)


@dataclass
class Stack:
    """One proxy in front of the shared engines, with the shim and the recorder."""

    mode: str
    engines: Engines
    proxy: RunningProxy
    prefill_shim: Shim  # fills kv_transfer_params as MoRIIOConnector would; records
    decode_shim: Shim  # records only

    def instances(self) -> list[Instance]:
        return instances_for(self.mode, self.prefill_shim, self.decode_shim)


def instances_for(mode: str, prefill_shim: Shim, decode_shim: Shim) -> list[Instance]:
    return [
        Instance(
            role="P",
            http_address=prefill_shim.address,
            kv_host=PREFILL_KV.kv_host,
            handshake_port=PREFILL_KV.handshake_port,
            notify_port=PREFILL_KV.notify_port,
            dp_size=PREFILL_KV.dp_size,
            tp_size=PREFILL_KV.tp_size,
            transfer_mode=mode,  # type: ignore[arg-type]
        ),
        Instance(
            role="D",
            http_address=decode_shim.address,
            kv_host=DECODE_KV[0],
            handshake_port=DECODE_KV[1],
            notify_port=DECODE_KV[2],
            dp_size=1,
            tp_size=1,
            transfer_mode=mode,  # type: ignore[arg-type]
        ),
    ]


@contextlib.asynccontextmanager
async def shims(engines: Engines) -> AsyncIterator[tuple[Shim, Shim]]:
    prefill = Shim(engines.prefill.url, producer=PREFILL_KV)
    decode = Shim(engines.decode.url)
    await prefill.start()
    await decode.start()
    try:
        yield prefill, decode
    finally:
        await prefill.stop()
        await decode.stop()


@contextlib.asynccontextmanager
async def real_stack(engines: Engines, mode: str, **overrides: object) -> AsyncIterator[Stack]:
    async with shims(engines) as (prefill, decode):
        statics = instances_for(mode, prefill, decode)
        async with running_proxy(static_instances=statics, **overrides) as proxy:
            yield Stack(mode, engines, proxy, prefill, decode)


@pytest.fixture(params=["READ", "WRITE"])
async def stack(request: pytest.FixtureRequest, real_engines: Engines) -> AsyncIterator[Stack]:
    async with real_stack(real_engines, request.param) as running:
        yield running
