"""VersionProbe: each instance asked for its vLLM version when it arrives, again when it
returns or changes shape, and again later while it does not answer. A fake upstream
stands in for the HTTP calls."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from moriio_proxy.protocol import Instance
from moriio_proxy.registry import Registry
from moriio_proxy.upstream import UpstreamConnectError
from moriio_proxy.version_probe import VersionProbe
from tests.harness.waiting import eventually


class FakeUpstream:
    """Answers GET /version from ``versions`` (by base URL); anything else is unreachable."""

    def __init__(self) -> None:
        self.versions: dict[str, Any] = {}
        self.asked: list[str] = []

    async def get_json(self, url: str, timeout: float) -> Any:
        self.asked.append(url)
        base = url.removesuffix("/version")
        if base not in self.versions:
            raise UpstreamConnectError(f"cannot connect to {url}", url=url)
        return self.versions[base]


def instance(n: int, tp: int = 1) -> Instance:
    return Instance("D", f"127.0.0.{n}:8000", f"127.0.0.{n}", 6301, 61005, 1, tp, "WRITE")


def setup(**kwargs: Any) -> tuple[Registry, FakeUpstream, VersionProbe, list[int]]:
    registry = Registry(10.0)
    upstream = FakeUpstream()
    learned: list[int] = []
    probe = VersionProbe(
        registry,
        upstream,  # type: ignore[arg-type]
        on_learned=lambda: learned.append(1),
        retry=(0.01, 0.04),
        **kwargs,
    )
    return registry, upstream, probe, learned


async def test_an_instance_is_asked_when_it_arrives() -> None:
    registry, upstream, probe, learned = setup()
    upstream.versions["http://127.0.0.1:8000"] = {"version": "0.32.0"}
    registry.upsert(instance(1))  # registered before the probe starts (a static one)
    await probe.start()
    registry.upsert(instance(2))
    upstream.versions["http://127.0.0.2:8000"] = {"version": "0.33.0"}
    entries = registry.entries()
    await eventually(lambda: all(e.vllm_version for e in entries))
    assert [(e.vllm_version, e.release) for e in entries] == [
        ("0.32.0", (0, 32)),
        ("0.33.0", (0, 33)),
    ]
    assert learned == [1, 1]
    await probe.stop()


async def test_an_instance_that_does_not_answer_is_asked_again_later() -> None:
    registry, upstream, probe, _ = setup()
    await probe.start()
    registry.upsert(instance(1))
    await eventually(lambda: len(upstream.asked) >= 3)
    (entry,) = registry.entries()
    assert entry.vllm_version is None  # still unknown: treated as 0.32
    upstream.versions["http://127.0.0.1:8000"] = {"version": "0.33.0"}
    await eventually(lambda: entry.vllm_version == "0.33.0")
    asked = len(upstream.asked)
    await asyncio.sleep(0.1)
    assert len(upstream.asked) == asked  # known: not asked again
    await probe.stop()


async def test_an_answer_that_is_not_a_version_leaves_it_unknown() -> None:
    registry, upstream, probe, learned = setup()
    upstream.versions["http://127.0.0.1:8000"] = {"detail": "Not Found"}
    await probe.start()
    registry.upsert(instance(1))
    await eventually(lambda: len(upstream.asked) >= 2)
    assert registry.entries()[0].vllm_version is None and learned == []
    await probe.stop()


async def test_returning_after_eviction_or_with_another_shape_asks_again() -> None:
    registry, upstream, probe, _ = setup()
    base = "http://127.0.0.1:8000"
    upstream.versions[base] = {"version": "0.32.0"}
    await probe.start()
    registry.upsert(instance(1))
    await eventually(lambda: registry.entries()[0].vllm_version == "0.32.0")
    registry.remove(instance(1).key, "heartbeat_timeout")
    upstream.versions[base] = {"version": "0.33.0"}  # upgraded while away
    registry.upsert(instance(1))
    await eventually(lambda: registry.entries()[0].vllm_version == "0.33.0")
    upstream.versions[base] = {"version": "0.33.1"}
    registry.upsert(dataclasses.replace(instance(1), tp_size=2))  # restarted, other TP
    await eventually(lambda: registry.entries()[0].vllm_version == "0.33.1")
    await probe.stop()


async def test_an_instance_that_leaves_is_no_longer_asked() -> None:
    registry, upstream, probe, _ = setup()
    await probe.start()
    registry.upsert(instance(1))
    await eventually(lambda: len(upstream.asked) >= 1)
    registry.remove(instance(1).key, "heartbeat_timeout")
    await asyncio.sleep(0.02)
    asked = len(upstream.asked)
    await asyncio.sleep(0.1)
    assert len(upstream.asked) == asked
    await probe.stop()
    registry.upsert(instance(2))  # stopped: no longer listening
    await asyncio.sleep(0.02)
    assert len(upstream.asked) == asked
