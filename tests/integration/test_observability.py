"""What an operator sees of real requests through simulated instances: metric values, the
access-log line and the trace, with both legs carrying the trace context."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moriio_proxy.access_log import LOGGER
from moriio_proxy.sim import SimFaults, expected_text
from moriio_proxy.tracing import Tracing
from tests.harness import RunningProxy, eventually, read_sse, running_proxy

MODES = ["READ", "WRITE"]
PROMPT = "observability prompt that must never be logged"
PHASES = (
    "moriio_proxy_request_duration_seconds",
    "moriio_proxy_time_to_first_token_seconds",
    "moriio_proxy_prefill_duration_seconds",
    "moriio_proxy_decode_first_byte_seconds",
)
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def ask(
    http: aiohttp.ClientSession, proxy: RunningProxy, stream: bool, **headers: str
) -> tuple[int, str]:
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 5, "stream": stream}
    async with http.post(proxy.url + "/v1/completions", json=body, headers=headers) as resp:
        if stream and resp.status == 200:
            events = await read_sse(resp)
            return resp.status, "".join(
                e["choices"][0]["text"] for e in events if isinstance(e, dict)
            )
        payload = await resp.json()
        return resp.status, payload["choices"][0]["text"] if resp.status == 200 else ""


def header(headers: dict[str, str], name: str) -> str:
    return {k.lower(): v for k, v in headers.items()}[name]


def value(proxy: RunningProxy, name: str, **labels: str) -> float:
    return proxy.state.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("mode", MODES)
async def test_every_phase_counts_each_request_once(mode: str, http: aiohttp.ClientSession):
    async with running_proxy() as proxy:
        await proxy.add_sim("P", mode=mode)
        await proxy.add_sim("D", mode=mode, token_latency=0.05)
        await proxy.wait_registered(1, 1)
        for stream in (False, True, False, True, True):
            assert await ask(http, proxy, stream) == (200, expected_text(PROMPT, 5))

        ok = {"endpoint": "completions", "mode": mode, "outcome": "ok"}
        for name in PHASES:
            assert value(proxy, name + "_count", **ok) == 5, name
        assert value(proxy, "moriio_proxy_stream_chunks_per_second_count", **ok) == 3
        gaps = value(
            proxy, "moriio_proxy_inter_chunk_seconds_count", endpoint="completions", mode=mode
        )
        # Five token events and [DONE] per stream: at most five gaps between writes each.
        assert 3 <= gaps <= 15
        assert value(proxy, "moriio_proxy_request_duration_seconds_sum", **ok) > 0


async def test_a_failed_attempt_counts_against_its_instance_until_it_is_evicted(
    http: aiohttp.ClientSession,
):
    async with running_proxy(prefill_policy="round_robin", max_retries=2, eject_after=0) as proxy:
        good = await proxy.add_sim("P")
        bad = await proxy.add_sim("P", faults=SimFaults(status=503))
        decode = await proxy.add_sim("D")
        await proxy.wait_registered(2, 1)
        for _ in range(4):  # round robin: the failing prefill is chosen first 3 or 4 times
            assert (await ask(http, proxy, False))[0] == 200
        errors = "moriio_proxy_instance_errors_total"
        failed = value(proxy, errors, role="P", address=bad.http_address, kind="status")
        assert failed >= 2
        assert value(proxy, errors, role="P", address=good.http_address, kind="status") == 0
        assert (
            value(proxy, "moriio_proxy_requests_total", endpoint="completions", outcome="ok") == 4
        )
        # The retried requests still count once each, as ok.
        ok = {"endpoint": "completions", "mode": "READ", "outcome": "ok"}
        assert value(proxy, "moriio_proxy_request_duration_seconds_count", **ok) == 4
        inflight = "moriio_proxy_instance_inflight"
        assert (
            proxy.state.metrics.registry.get_sample_value(
                inflight, {"role": "D", "address": decode.http_address}
            )
            == 0
        )

        await bad.stop()  # no more heartbeats: evicted after the TTL
        proxy.sims.remove(bad)
        await eventually(lambda: len(proxy.state.registry.entries()) == 2, what="an eviction")
        scraped = proxy.state.metrics.render().decode()
        assert bad.http_address not in scraped
        assert f'address="{good.http_address}"' in scraped  # the gauge of the live one


async def test_an_engines_4xx_is_the_requests_fault_not_the_instances(
    http: aiohttp.ClientSession,
):
    async with running_proxy() as proxy:
        await proxy.add_sim("P")
        decode = await proxy.add_sim("D", faults=SimFaults(status=400))
        await proxy.wait_registered(1, 1)
        assert (await ask(http, proxy, False))[0] == 400
        failed = {"endpoint": "completions", "mode": "READ", "outcome": "error_400"}
        assert value(proxy, "moriio_proxy_request_duration_seconds_count", **failed) == 1
        assert value(proxy, "moriio_proxy_prefill_duration_seconds_count", **failed) == 1
        assert value(proxy, "moriio_proxy_time_to_first_token_seconds_count", **failed) == 0
        assert value(proxy, "moriio_proxy_upstream_errors_total", leg="decode", kind="status") == 1
        assert "moriio_proxy_instance_errors_total{" not in proxy.state.metrics.render().decode()
        assert decode.stats.requests == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_one_access_log_line_per_request_without_prompt_or_internal_id(
    fmt: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_proxy(access_log_format=fmt) as proxy:
        prefill = await proxy.add_sim("P", mode="WRITE")
        decode = await proxy.add_sim("D", mode="WRITE")
        await proxy.wait_registered(1, 1)
        assert (await ask(http, proxy, True, **{"X-Request-Id": "client-42"}))[0] == 200
        assert (await ask(http, proxy, False, **{"X-Request-Id": "client-43"}))[0] == 200
        async with http.post(proxy.url + "/v1/completions", data=b"{") as resp:
            assert resp.status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 3
    for line in lines:
        assert "___prefill_addr_" not in line and "___decode_addr_" not in line
        assert "observability prompt" not in line
    internal = {
        header(leg.headers, "x-request-id") for sim in (prefill, decode) for leg in sim.legs
    }
    assert len(internal) == 2 and all(i.startswith("___prefill_addr_") for i in internal)
    assert not any(i in line for i in internal for line in lines)
    if fmt == "json":
        streamed, whole, bad = (json.loads(line) for line in lines)
        assert streamed["request_id"] == "client-42" and streamed["stream"] is True
        assert (streamed["prefill"], streamed["decode"]) == (
            prefill.http_address,
            decode.http_address,
        )
        assert (streamed["mode"], streamed["dp_rank"], streamed["attempts"]) == ("WRITE", 0, 1)
        assert (streamed["status"], streamed["outcome"]) == (200, "ok")
        assert streamed["chunks"] >= 5
        assert 0 < streamed["ttft_s"] <= streamed["total_s"]
        assert {"prefill_s", "decode_first_byte_s"} <= set(streamed)
        assert whole["request_id"] == "client-43" and "chunks" not in whole
        assert (bad["status"], bad["outcome"], bad["attempts"]) == (400, "bad_request", 0)
    else:
        assert lines[0].startswith("request_id=client-42 endpoint=completions status=200 ")
        assert f"prefill={prefill.http_address} dp_rank=0 decode={decode.http_address}" in lines[0]
        assert " mode=WRITE " in lines[0] and " attempts=1 " in lines[0]
        assert " ttft_s=" in lines[0] and " total_s=" in lines[0]
        assert " status=400 outcome=bad_request " in lines[2]


async def test_a_retried_request_logs_the_pair_that_answered(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = {"prefill_policy": "round_robin", "eject_after": 0, "access_log_format": "json"}
    async with running_proxy(**settings) as proxy:
        good = await proxy.add_sim("P")
        await proxy.add_sim("P", faults=SimFaults(status=503))
        await proxy.add_sim("D")
        await proxy.wait_registered(2, 1)
        for _ in range(4):
            assert (await ask(http, proxy, False))[0] == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 4
    assert {line["prefill"] for line in lines} == {good.http_address}
    attempts = [line["attempts"] for line in lines]
    assert set(attempts) <= {1, 2} and attempts.count(2) >= 2  # the bad one goes first often
    assert all(line["outcome"] == "ok" for line in lines)


async def test_access_log_off_writes_nothing(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running_proxy(access_log_format="off") as proxy:
        await proxy.add_sim("P")
        await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        assert (await ask(http, proxy, True))[0] == 200
    assert [r for r in caplog.records if r.name == LOGGER] == []


@pytest.mark.parametrize("mode", MODES)
async def test_both_legs_carry_the_trace_the_client_started(mode: str, http: aiohttp.ClientSession):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running_proxy(tracing=Tracing(provider)) as proxy:
        prefill = await proxy.add_sim("P", mode=mode)
        decode = await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        parent = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
        assert (await ask(http, proxy, True, traceparent=parent))[0] == 200
        await eventually(lambda: len(exporter.get_finished_spans()) == 4, what="four spans")

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/completions", "attempt 1", "prefill leg", "decode leg"}
    assert {s.context.trace_id for s in spans.values()} == {int(CLIENT_TRACE, 16)}
    request, attempt = spans["POST /v1/completions"], spans["attempt 1"]
    assert request.parent.span_id == 0x00F067AA0BA902B7
    assert attempt.parent.span_id == request.context.span_id
    for sim, name in ((prefill, "prefill leg"), (decode, "decode leg")):
        [leg] = sim.legs
        span = spans[name]
        assert (
            header(leg.headers, "traceparent")
            == f"00-{CLIENT_TRACE}-{span.context.span_id:016x}-01"
        )
        assert span.parent.span_id == attempt.context.span_id
        assert span.attributes["server.address"] == sim.http_address


async def test_without_tracing_no_leg_carries_a_traceparent(http: aiohttp.ClientSession):
    async with running_proxy() as proxy:
        prefill = await proxy.add_sim("P")
        decode = await proxy.add_sim("D")
        await proxy.wait_registered(1, 1)
        parent = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
        assert (await ask(http, proxy, False, traceparent=parent))[0] == 200
    for sim in (prefill, decode):
        assert all("traceparent" not in {k.lower() for k in leg.headers} for leg in sim.legs)


def test_a_proxy_without_tracing_never_imports_opentelemetry():
    """The hot path's only cost when tracing is off is a None check: not even the import."""
    code = (
        "import sys\n"
        "from moriio_proxy.app import create_app, state\n"
        "from moriio_proxy.config import load_config\n"
        "app = create_app(load_config({}, env={}))\n"
        "assert state(app).tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
