"""vLLM's profiler, started and stopped on every registered instance at once.

``vllm bench serve --profile`` posts ``/start_profile`` before its run and ``/stop_profile``
after it to the server it benchmarks; pointed at this proxy, both go to every prefill and
decode instance, so one command profiles the whole P/D deployment (vLLM's toy proxy does
the same). vLLM serves these routes only when started with a profiler configuration
(``--profiler-config``); any other instance answers 404, which is reported per instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

from ..registry import Entry
from ..upstream import Upstream

# vLLM writes its traces when the profiler stops: minutes for a big run (vLLM's docs speak
# of ten for a hundred requests of a 70B model).
DEFAULT_TIMEOUT = 900.0
MAX_TIMEOUT = 3600.0
_ERROR_CHARS = 300  # of an instance's error answer, quoted in the result


async def fan_out(
    upstream: Upstream, entries: Sequence[Entry], path: str, body: bytes, timeout: float
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to ``path`` on every instance, concurrently, each bounded by
    ``timeout``; 200 when every one succeeded, else 502, with one result per instance."""
    results = await asyncio.gather(*(_call(upstream, e, path, body, timeout) for e in entries))
    failed = sum(1 for r in results if r["error"] is not None)
    summary = {
        "action": path.strip("/"),
        "succeeded": len(results) - failed,
        "failed": failed,
        "instances": results,
    }
    return (502 if failed else 200), summary


async def _call(
    upstream: Upstream, entry: Entry, path: str, body: bytes, timeout: float
) -> dict[str, Any]:
    inst = entry.instance
    result: dict[str, Any] = {
        "role": inst.role,
        "http_address": inst.http_address,
        "status": None,
        "error": None,
    }
    url = inst.base_url + path
    headers = {"Content-Type": "application/json"} if body else {}
    limits = aiohttp.ClientTimeout(total=timeout, connect=upstream.timeouts.connect)
    try:
        async with upstream.session.post(url, data=body, headers=headers, timeout=limits) as resp:
            result["status"] = resp.status
            text = await resp.text(errors="replace")
    except asyncio.TimeoutError:
        result["error"] = f"no answer within {timeout:g}s"
        return result
    except aiohttp.ClientError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    if not 200 <= result["status"] < 300:
        detail = " ".join(text.split())[:_ERROR_CHARS] or "(empty body)"
        hint = " (vLLM serves it only when started with --profiler-config)"
        result["error"] = f"HTTP {result['status']}: {detail}" + (
            hint if result["status"] == 404 else ""
        )
    return result
