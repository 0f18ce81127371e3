"""A recording reverse proxy in front of a real vLLM, optionally standing in for the
one thing MoRIIOConnector changes on the HTTP surface of a prefill instance.

vLLM's MoRI-IO connector needs AMD's ``mori.io`` (ROCm), so the real engines of this tier
run without a KV connector. Such an engine accepts ``kv_transfer_params`` and ignores it:
the prefill leg comes back with ``"kv_transfer_params": null`` and finish_reason
``"length"``, which the proxy rightly refuses (502), since on a real MoRI-IO pair that
would mean a decode without KV.

``Shim(producer=...)`` fills in exactly what ``MoRIIOConnectorScheduler.request_finished``
of vLLM 0.32 returns for such a leg (``moriio_connector.py``), plus the
``remote_prefill_cached_tokens`` its scheduler adds: only when the request asked
for it (``kv_transfer_params.do_remote_decode: true``), the engine answered 200, and every
choice ended by the length cap; every other byte goes through unchanged, both ways. The
values are the ones the connector would report for this instance (engine id, host, the
ports as the strings of ``kv_connector_extra_config``, the DP rank the leg ran on, DP/TP
sizes, the leg's ``transfer_id``); the block ids are synthetic (one block per
``block_size`` prompt tokens, numbered by a counter), since there is no KV pool to point
into. The decode engine, also connector-less, then ignores those params and recomputes
the prompt itself: that is why greedy text through the proxy can equal a direct request.

``Shim(producer=None)`` changes nothing: it only records what the proxy sent and what the
real engine answered (used in front of the decode engine).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass(frozen=True)
class Producer:
    """What a kv_producer's ``kv_connector_extra_config`` and parallel config would say."""

    kv_host: str
    handshake_port: int
    notify_port: int
    dp_size: int = 1
    tp_size: int = 1
    block_size: int = 16

    @property
    def engine_id(self) -> str:
        # MoRIIOConnector.__init__: resolve_host_ip(extra_config) + ":" + handshake_port
        return f"{self.kv_host}:{self.handshake_port}"


@dataclass
class Exchange:
    """One HTTP request through the shim and the real engine's answer to it."""

    method: str
    path: str
    headers: CIMultiDict[str]  # as sent (case-insensitive keys)
    body: Any  # the parsed JSON request body (None when not JSON)
    status: int = 0
    response: Any = None  # the engine's parsed JSON answer, before any fill-in
    sse: list[Any] = field(default_factory=list)  # parsed SSE data payloads (streams)
    filled: dict[str, Any] | None = None  # kv_transfer_params the shim added, if any


class Shim:
    def __init__(self, upstream: str, producer: Producer | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.producer = producer
        self.exchanges: list[Exchange] = []
        self._next_block = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address = ""  # "127.0.0.1:PORT" once started

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.address = f"{bound[0]}:{bound[1]}"
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def generation_legs(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.startswith("/v1/") and e.method == "POST"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        exchange = Exchange(request.method, request.path_qs, CIMultiDict(request.headers), body)
        self.exchanges.append(exchange)
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=raw, headers=headers
        ) as upstream:
            exchange.status = upstream.status
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._relay_stream(request, upstream, out_headers, exchange)
            data = await upstream.read()
            try:
                exchange.response = json.loads(data)
            except ValueError:
                exchange.response = None
            filled = self._fill(exchange)
            if filled is not None:
                answer = dict(exchange.response)
                answer["kv_transfer_params"] = filled
                exchange.filled = filled
                data = json.dumps(answer).encode()
            return web.Response(body=data, status=upstream.status, headers=out_headers)

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
        exchange: Exchange,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        buffer = b""
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            buffer += chunk
        for line in buffer.decode(errors="replace").splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                exchange.sse.append(payload if payload == "[DONE]" else json.loads(payload))
        await response.write_eof()
        return response

    def _fill(self, exchange: Exchange) -> dict[str, Any] | None:
        """The connector's request_finished() return value, when it would return one."""
        producer, body, answer = self.producer, exchange.body, exchange.response
        if producer is None or exchange.status != 200 or not isinstance(answer, dict):
            return None
        params = body.get("kv_transfer_params") if isinstance(body, dict) else None
        if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
            return None
        if answer.get("kv_transfer_params") is not None:
            return None  # a real connector answered: never overwrite it
        choices = answer.get("choices") or []
        # request_finished: only a FINISHED_LENGTH_CAPPED request hands its KV over.
        if not choices or any(c.get("finish_reason") != "length" for c in choices):
            return None
        prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 1)
        n_blocks = max(1, math.ceil(prompt_tokens / producer.block_size))
        blocks = list(range(self._next_block, self._next_block + n_blocks))
        self._next_block += n_blocks
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [blocks],  # one list per KV-cache group (one here)
            "remote_engine_id": producer.engine_id,
            "remote_host": producer.kv_host,
            # kv_connector_extra_config values: strings, as in every launch example
            "remote_handshake_port": str(producer.handshake_port),
            "remote_notify_port": str(producer.notify_port),
            "remote_dp_rank": _dp_rank(exchange.headers, producer.dp_size),
            "remote_dp_rank_override": True,
            "remote_dp_size": producer.dp_size,
            "remote_dp_size_local": producer.dp_size,
            "tp_size": producer.tp_size,
            "transfer_id": params.get("transfer_id"),
            # Added by the scheduler (_update_from_output) on top of request_finished's
            # dict: the prompt tokens P found in its prefix cache (0 unless reported).
            "remote_prefill_cached_tokens": _cached_tokens(answer),
        }


def _cached_tokens(answer: dict[str, Any]) -> int:
    details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return cached if isinstance(cached, int) else 0


def _dp_rank(headers: CIMultiDict[str], dp_size: int) -> int:
    """The DP rank the leg ran on: vLLM honours X-data-parallel-rank (400 when out of
    range), so the header is the rank; without it the engine picked one we cannot see."""
    try:
        rank = int(headers.get("X-data-parallel-rank", "0"))
    except ValueError:
        return 0
    return rank if 0 <= rank < dp_size else 0
