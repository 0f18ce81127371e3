"""The load generator: closed-loop users, in one or more worker processes, on a shared clock.

A cell is run by every worker at once (``workers.py``): each gets a share of the users
(connections) and the same ``Window`` of instants on CLOCK_MONOTONIC (``time.monotonic``,
one clock for every process of the machine): ``start`` (users begin), ``measure`` (warm-up
over) and ``stop`` (users send nothing new). Only requests that end inside [measure, stop)
count, so every worker measures the same window and the results merge by concatenation. A
user still waiting ``grace`` seconds after ``stop`` is counted as a timeout.

Two kinds of user:

* ``target``: one request to the proxy under test, the client's view.
* ``floor``: what any proxy must do, done here with no proxy at all: the prefill leg to a
  simulated P, then (READ) the decode leg built from P's answer, or (WRITE) both legs at
  once, each built by ``moriio_proxy.protocol``'s builders, the proxy's own. Its latency
  and throughput are the floor a proxy's figures are compared with.

Every final answer is checked: HTTP status, a stream that ends with ``[DONE]``, the text
against ``moriio_proxy.sim.expected_text`` and (target users) the internal request id
``___prefill_addr_`` that must never reach a client.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moriio_proxy.protocol import (
    ClientRequest,
    Instance,
    Leg,
    TransferMode,
    build_decode_leg,
    build_prefill_leg,
    check_read_params,
    new_request_id,
    new_transfer_id,
    parse_client_request,
)
from moriio_proxy.sim import expected_text

from .http1 import Connection, Response, encode_request

PROMPTS = 1024  # distinct prompts, cycled; more than the largest concurrency
LEAK_MARKER = b"___prefill_addr_"
# A streamed completion chunk's text; the simulator's words need no JSON escapes.
_TEXT_RE = re.compile(rb'"text": ?"((?:[^"\\]|\\.)*)"')
_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Job:
    """One worker's share of one cell."""

    kind: Literal["target", "floor"]
    mode: TransferMode
    stream: bool
    max_tokens: int
    users: int
    first_user: int  # global index of this worker's first user
    target: tuple[str, int] | None = None  # kind "target": host and port
    prefills: tuple[Instance, ...] = ()  # kind "floor"
    decodes: tuple[Instance, ...] = ()


@dataclass(frozen=True)
class Window:
    """The instants of one cell on CLOCK_MONOTONIC, the same for every worker."""

    start: float  # users begin (warm-up)
    measure: float  # warm-up over: what ends from here on counts
    stop: float  # users send nothing new; what ends from here on does not count
    grace: float  # seconds after stop before a user still waiting is a timeout


@dataclass
class Outcome:
    """What the users of one worker saw in the measured window."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    leaks: int = 0
    error_samples: list[str] = field(default_factory=list)
    sent: int = 0  # requests sent in the whole cell, warm-up included

    def merge(self, other: Outcome) -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.errors.update(other.errors)
        self.leaks += other.leaks
        self.sent += other.sent
        room = _ERROR_SAMPLES - len(self.error_samples)
        self.error_samples += other.error_samples[: max(room, 0)]


@dataclass(frozen=True)
class Prompt:
    text: str
    expected: str
    expected_json: bytes  # the expected text as it appears inside JSON strings
    request: ClientRequest


def prompts(max_tokens: int, stream: bool) -> list[Prompt]:
    out = []
    for i in range(PROMPTS):
        text = f"benchmark prompt number {i} about disaggregated serving"
        body = {"model": "sim-model", "prompt": text, "max_tokens": max_tokens, "stream": stream}
        expected = expected_text(text, max_tokens)
        out.append(
            Prompt(
                text,
                expected,
                json.dumps(expected)[1:-1].encode(),
                parse_client_request("completions", body),
            )
        )
    return out


def check(resp: Response, prompt: Prompt, stream: bool) -> str | None:
    """Why the client's answer is wrong (an error label), or None when it is right."""
    if resp.status != 200:
        return f"http_{resp.status}"
    body = resp.body
    if stream:
        if not body.rstrip().endswith(b"data: [DONE]"):
            return "stream_without_done"
        if b"".join(_TEXT_RE.findall(body)) != prompt.expected_json:
            return "sse_error" if b'data: {"error"' in body else "wrong_text"
        return None
    try:
        text = json.loads(body)["choices"][0]["text"]
    except (ValueError, LookupError, TypeError):
        return "bad_body"
    return None if text == prompt.expected else "wrong_text"


class _User:
    """One closed-loop client: a request, its answer, the next request."""

    def __init__(
        self,
        job: Job,
        index: int,
        pool: Sequence[Prompt],
        wire: Sequence[bytes],
        outcome: Outcome,
    ) -> None:
        self.job = job
        self.pool = pool
        self.wire = wire  # kind "target": each prompt's request, encoded once per worker
        self.outcome = outcome
        self.next_prompt = index * 7
        if job.kind == "floor":
            self.prefill = job.prefills[index % len(job.prefills)]
            self.decode = job.decodes[index % len(job.decodes)]
        self.conns: dict[str, Connection] = {}
        self.window = Window(0.0, 0.0, 0.0, 0.0)

    async def connect(self) -> None:
        if self.job.kind == "target":
            assert self.job.target is not None
            self.conns["target"] = await Connection.open(*self.job.target)
        else:
            for name, inst in (("P", self.prefill), ("D", self.decode)):
                host, _, port = inst.http_address.rpartition(":")
                self.conns[name] = await Connection.open(host, int(port))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()

    async def run(self, window: Window) -> None:
        job, outcome = self.job, self.outcome
        self.window = window  # _record reads it
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        while time.monotonic() < window.stop:
            prompt_index = self.next_prompt % len(self.pool)
            self.next_prompt += 1
            prompt = self.pool[prompt_index]
            outcome.sent += 1
            try:
                if job.kind == "target":
                    resp = await self._target(prompt_index)
                    started = resp.started
                else:
                    started, resp = await self._floor(prompt)
                label = check(resp, prompt, job.stream)
            except (ConnectionError, OSError) as exc:
                self._record(time.monotonic(), "transport", str(exc))
                await asyncio.sleep(0.05)  # a dead server must not turn this into a spin
                self.close()
                await self.connect()
                continue
            except _LegError as exc:
                self._record(time.monotonic(), exc.label, exc.detail)
                continue
            if label is not None:
                self._record(resp.done, label, resp.body[:300].decode("utf-8", "replace"))
            elif window.measure <= resp.done < window.stop:
                outcome.latencies.append(resp.done - started)
                if job.stream:
                    outcome.ttfts.append(resp.first_byte - started)
            if job.kind == "target" and window.measure <= resp.done < window.stop:
                outcome.leaks += LEAK_MARKER in resp.body
            if resp.close:
                self.close()
                await self.connect()

    def _record(self, when: float, label: str, detail: str) -> None:
        if self.window.measure <= when < self.window.stop:
            self.outcome.errors[label] += 1
            if len(self.outcome.error_samples) < _ERROR_SAMPLES:
                self.outcome.error_samples.append(f"{label}: {detail}")

    async def _target(self, prompt_index: int) -> Response:
        return await self.conns["target"].request(self.wire[prompt_index])

    async def _floor(self, prompt: Prompt) -> tuple[float, Response]:
        """The two legs a proxy sends, sent from here; returns (start, decode's answer)."""
        job, p, d = self.job, self.prefill, self.decode
        nonce = uuid.uuid4().hex  # what the proxy does per request: both ids share it
        transfer_id = new_transfer_id(nonce)
        request_id = new_request_id(p, d, nonce)
        started = time.monotonic()
        prefill = build_prefill_leg(
            prompt.request, p, d, transfer_id=transfer_id, request_id=request_id, dp_rank=0
        )

        def decode_leg(params: Any) -> bytes:
            leg = build_decode_leg(
                prompt.request,
                p,
                d,
                mode=job.mode,
                transfer_id=transfer_id,
                request_id=request_id,
                dp_rank=0,
                prefill_params=params,
            )
            return _encode_leg(leg, d)

        if job.mode == "WRITE":  # both legs at once: decode's params do not wait for P's
            p_resp, d_resp = await asyncio.gather(
                self.conns["P"].request(_encode_leg(prefill, p)),
                self.conns["D"].request(decode_leg(None)),
            )
            _check_prefill(p_resp)
            return started, d_resp
        p_resp = await self.conns["P"].request(_encode_leg(prefill, p))
        _check_prefill(p_resp)
        params = json.loads(p_resp.body).get("kv_transfer_params")
        problem = check_read_params(params, transfer_id)
        if problem is not None:
            raise _LegError("prefill_params", problem)
        return started, await self.conns["D"].request(decode_leg(params))


def _check_prefill(resp: Response) -> None:
    if resp.status != 200:
        raise _LegError(f"prefill_http_{resp.status}", resp.body[:300].decode("utf-8", "replace"))


class _LegError(Exception):
    def __init__(self, label: str, detail: str) -> None:
        super().__init__(label)
        self.label = label
        self.detail = detail


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _encode_leg(leg: Leg, inst: Instance) -> bytes:
    host, _, port = inst.http_address.rpartition(":")
    path = leg.url[len(inst.base_url) :]
    return encode_request(host, int(port), path, _dumps(leg.body), leg.headers)


class Prepared:
    """A worker's users for one cell, connected and ready to start."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.outcome = Outcome()
        pool = prompts(job.max_tokens, job.stream)
        wire: list[bytes] = []
        if job.target is not None:
            host, port = job.target
            path = "/v1/completions"
            wire = [encode_request(host, port, path, _dumps(p.request.body)) for p in pool]
        self.users = [
            _User(job, job.first_user + i, pool, wire, self.outcome) for i in range(job.users)
        ]

    async def connect(self) -> None:
        await asyncio.gather(*(u.connect() for u in self.users))

    async def run(self, window: Window) -> Outcome:
        outcome = self.outcome
        tasks = [asyncio.create_task(u.run(window)) for u in self.users]
        timeout = window.stop + window.grace - time.monotonic()
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            outcome.errors["timeout"] += len(pending)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                outcome.errors["loadgen_crash"] += 1
                outcome.error_samples.append(f"loadgen_crash: {task.exception()!r}")
        self.close()
        await asyncio.sleep(0)  # let the transports close before the loop goes
        return outcome

    def close(self) -> None:
        for user in self.users:
            user.close()
