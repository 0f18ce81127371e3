"""Real vLLM (the CPU build from PyPI) behind the proxy: fixtures of the ``real_vllm`` tier.

One prefill engine (``--data-parallel-size 2``, so the proxy's X-data-parallel-rank is
judged by a real engine) and one decode engine run for all of tests/real, from the
separate venv that ``scripts/real_vllm/setup.sh`` builds. Each test gets its own proxy
(in-process, tests/harness/proxy.py), a kv shim in front of the prefill engine and a recorder in
front of the decode engine (tests/real/kv_shim.py explains why and what they do).

Without the venv the tier skips with one line, unless ``MORIIO_REAL_VLLM=required`` (CI):
then it fails.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from moriio_proxy.protocol import Instance
from tests.harness import RunningProxy, free_port, running_proxy
from tests.real.engines import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MODEL_NAME,
    REQUIRED,
    SETUP,
    START_TIMEOUT,
    Engine,
    PortTaken,
    missing_reason,
    start_engine,
    stop_engine,
    wait_healthy,
)
from tests.real.kv_shim import Producer, Shim

PREFILL_DP = 2
# The MoRI-IO side of each instance as it would announce itself (nothing listens there:
# the engines run without the connector; the proxy only puts these in the legs).
PREFILL_KV = Producer("127.0.0.1", 6301, 6105, dp_size=PREFILL_DP, block_size=BLOCK_SIZE)
DECODE_KV = ("127.0.0.1", 7301, 7501)


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
class Engines:
    prefill: Engine
    decode: Engine
    model: str = MODEL_NAME
    max_model_len: int = MAX_MODEL_LEN


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
            start_engine("prefill", folder, prefill_port, dp_args),
            start_engine("decode", folder, decode_port, []),
        ]
        try:
            wait_healthy(started, START_TIMEOUT)
        except BaseException as exc:  # also Ctrl-C: never leave engines behind
            for engine in started:
                stop_engine(engine)
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
            stop_engine(engine)


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
