"""A simulated vLLM 0.32 instance running the MoRI-IO KV connector (``MoRIIOConnector``).

Why this exists: the proxy can only be trusted if it is tested against something that
behaves like vLLM 0.32, including the ways vLLM fails. This module is deliberately an
independent reading of vLLM's source (it imports nothing from the rest of ``moriio_proxy``)
so that a misunderstanding in the proxy is not silently mirrored here.

What is simulated (each point mirrors vLLM 0.32's ``kv_connector/v1/moriio/`` and
``entrypoints/`` sources; the wire contract is ``docs/protocol.md``):

* The OpenAI HTTP server: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``, vLLM's response and SSE shapes, its 400s, ``id = "cmpl-" + X-Request-Id``.
* A toy model: a token is a whitespace-separated word, output is a deterministic function of
  the KV cache contents (a fingerprint of the prompt). A decode instance generates from the
  fingerprint it *received*, so a broken KV transfer produces wrong text, as on hardware.
* The connector's scheduler-side decisions (``update_state_after_alloc``, ``add_new_req``,
  ``request_finished``), including the ones that raise inside EngineCore and kill the whole
  engine, and the ones that make a request wait forever.
* Discovery heartbeats (msgpack map over a ZMQ DEALER) and per-DP-rank notify / handshake
  ROUTER sockets. KV "transfers" between simulated instances are ZMQ messages on those ports,
  so a wrong host, port or DP rank breaks them like a wrong RDMA target would.

Fault injection (``SimFaults`` on ``SimInstance.faults``, or ``POST /sim/faults`` for a
subprocess sim; ``GET /sim/stats`` reads the counters): error statuses, connections cut after
k tokens, stalls before the first byte or mid-stream, and a listener that refuses connections
while heartbeats continue, each for a seeded fraction of requests. Faults are a test device,
not vLLM behaviour; everything else stays 0.32's.

Everything lives on the instance objects: several instances can run in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import re
import signal
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from aiohttp import web

logger = logging.getLogger(__name__)

#: A prompt containing this literal makes the simulated engine emit EOS as its first token,
#: whatever ``min_tokens`` says. It simulates an engine that ends a request early, which is
#: the only way a ``max_tokens: 1, min_tokens: 1`` prefill leg can come back with
#: ``kv_transfer_params: null`` (exercises the proxy's "P answered the whole request" path).
EOS_MARKER = "[sim:eos]"

# The words a "correct" engine outputs, and disjoint ones for garbage (an answer computed
# without valid KV): garbage can never equal expected_text for n >= 1.
_VOCAB: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "basil", "cedar", "dune", "ember", "fjord",
)  # fmt: skip
_GARBAGE_VOCAB: tuple[str, ...] = (
    "#qz", "#vx", "#kj", "#wq", "#zzt", "#pxq", "#jjv", "#qqk",
)  # fmt: skip

# vLLM 0.32 moriio_common.py:433-436: the router embeds both zmq addresses in the request id.
_PREFILL_ZMQ_RE = re.compile(r"___prefill_addr_(.+?)___decode_addr_")
_DECODE_ZMQ_RE = re.compile(r"___decode_addr_(.+)_[0-9a-f]{32}(?:-.*)?$")

_GET_META_MSG = b"get_meta_msg"  # MoRIIOConstants.GET_META_MSG
_MAX_TERMINAL_TRANSFERS = 10_000
_AUTO_PORT_LOW = 20_000  # below Linux's ephemeral range (32768-60999): no TCP self-connect
_AUTO_PORT_HIGH = 32_000
_LISTENER_POLL = 0.02  # seconds: how soon a mutated SimFaults.refuse_connections takes effect


class _Signal:
    """A queue sentinel (engine died / instance stopping)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_DEAD = _Signal("engine-dead")
_SHUTDOWN = _Signal("shutting-down")


# --------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------


_INF_WORDS = ("inf", "+inf", "infinity", "+infinity")


def _seconds(value: Any, name: str) -> float:
    """A duration in seconds: a number >= 0, ``math.inf`` or the string ``"inf"``."""
    if isinstance(value, str) and value.strip().lower() in _INF_WORDS:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds >= 0 or 'inf', got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or 'inf', got {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _json_seconds(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


@dataclass
class SimFaults:
    """Faults injected into one simulated instance, for failure-semantics tests and soaks.

    Live on ``SimInstance.faults``: assign a new object or mutate fields at run time (both take
    effect for the next request; ``refuse_connections`` within ~20 ms, or at once through
    ``await SimInstance.set_faults(...)``). Subprocess sims: ``POST /sim/faults``.

    The per-request faults (``status``, ``die_after_tokens``, ``stall_first_byte``,
    ``stall_after_tokens``) apply only to generation requests (``/v1/completions``,
    ``/v1/chat/completions``) that pass vLLM's validation (a malformed request still gets its
    400), and only to the ``probability`` fraction of them, drawn once per request from an RNG
    seeded with ``SimConfig.seed``. A request that draws a hit gets every per-request fault set:
    ``status`` wins outright; otherwise ``stall_first_byte``, then serving with
    ``stall_after_tokens`` and ``die_after_tokens`` (stall first when both fire at one point).
    "k tokens" counts engine tokens across all choices of the request.
    """

    #: Answer with this HTTP status (400-599) and vLLM's error JSON instead of serving. The
    #: engine never sees the request: a prefill leg registers no KV blocks, a WRITE-mode decode
    #: leg sends no notify.
    status: int | None = None
    #: Serve, but cut the connection (transport closed: no final chunk, no usage chunk, no
    #: ``[DONE]``, no terminating HTTP chunk) once k tokens have been generated: a stream
    #: carries exactly the first k token chunks (k=0: headers only); a non-streaming request
    #: gets no response at all. A request with fewer than k tokens completes normally. The
    #: engine request is aborted like a client disconnect, except when the k-th token was its
    #: last: then the engine had already finished (a prefill leg holds its blocks until
    #: ``defer_timeout`` reaps them, as in 0.32 when an answer is lost).
    die_after_tokens: int | None = None
    #: Send nothing (not even headers) for this many seconds before the engine starts on the
    #: request; ``math.inf``: until the client disconnects (the leg is then recorded cancelled).
    stall_first_byte: float | None = None
    #: ``(k, s)``: after k tokens go silent for s seconds (``math.inf``: forever), connection
    #: kept open (streams: after the k-th token chunk; k=0: after the headers).
    stall_after_tokens: tuple[int, float] | None = None
    #: Close the HTTP listening socket (idle keep-alive connections are closed too; in-flight
    #: requests finish) while heartbeats continue: an instance that looks alive but cannot be
    #: reached. ``/sim/*`` on the HTTP port is unreachable too; use ``SimConfig.control_port``.
    #: Turning it off re-binds the same port.
    refuse_connections: bool = False
    #: Fraction of generation requests the per-request faults apply to (1.0: all).
    probability: float = 1.0

    @property
    def per_request(self) -> bool:
        """True when a per-request fault is configured (a probability draw is made)."""
        return (
            self.status is not None
            or self.die_after_tokens is not None
            or self.stall_first_byte is not None
            or self.stall_after_tokens is not None
        )

    def validate(self) -> None:
        """Raise ValueError on a bad field; normalise types (seconds to float, tuple pair)."""
        if self.status is not None and (
            isinstance(self.status, bool)
            or not isinstance(self.status, int)
            or not 400 <= self.status <= 599
        ):
            raise ValueError(f"status must be an HTTP status 400-599, got {self.status!r}")
        if self.die_after_tokens is not None:
            _count(self.die_after_tokens, "die_after_tokens")
        if self.stall_first_byte is not None:
            self.stall_first_byte = _seconds(self.stall_first_byte, "stall_first_byte")
        if self.stall_after_tokens is not None:
            pair = self.stall_after_tokens
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(
                    f"stall_after_tokens must be a pair [tokens, seconds], got {pair!r}"
                )
            self.stall_after_tokens = (
                _count(pair[0], "stall_after_tokens[0]"),
                _seconds(pair[1], "stall_after_tokens[1]"),
            )
        if not isinstance(self.refuse_connections, bool):
            raise ValueError(
                f"refuse_connections must be a boolean, got {self.refuse_connections!r}"
            )
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be a number in [0, 1], got {p!r}")
        self.probability = float(p)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: infinite seconds become the string ``"inf"``."""
        pair = self.stall_after_tokens
        return {
            "status": self.status,
            "die_after_tokens": self.die_after_tokens,
            "stall_first_byte": (
                None if self.stall_first_byte is None else _json_seconds(self.stall_first_byte)
            ),
            "stall_after_tokens": None if pair is None else [pair[0], _json_seconds(pair[1])],
            "refuse_connections": self.refuse_connections,
            "probability": self.probability,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: SimFaults | None = None) -> SimFaults:
        """Build from JSON fields (unknown keys: ValueError), starting from ``base`` or defaults.

        Seconds accept a number or ``"inf"``; null turns a fault off.
        """
        if not isinstance(data, dict):
            raise ValueError("the faults body must be a JSON object")
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown fault field(s): {', '.join(unknown)} (known: {', '.join(known)})"
            )
        out = copy.deepcopy(base) if base is not None else cls()
        for key, value in data.items():
            setattr(out, key, value)
        if "refuse_connections" in data and data["refuse_connections"] is None:
            out.refuse_connections = False
        if "probability" in data and data["probability"] is None:
            out.probability = 1.0
        out.validate()
        return out


@dataclass
class SimConfig:
    """How to run one simulated vLLM instance (the knobs of ``vllm serve`` + MoRI-IO)."""

    role: str  # "P" (kv_producer) or "D" (kv_consumer)
    host: str = "127.0.0.1"  # HTTP bind host and the advertised IP (http_address / zmq host)
    port: int = 0  # HTTP port; 0 = pick a free one
    proxy: str | None = None  # "HOST:PORT" of the proxy's discovery ROUTER; None = no heartbeat
    mode: str = "READ"  # "READ" or "WRITE" (transfer_mode)
    dp_size: int = 1
    tp_size: int = 1
    model: str = "sim-model"
    handshake_port: int = 0  # base port; 0 = pick free (below 32768)
    notify_port: int = 0  # base port; 0 = pick free (below 32768)
    heartbeat_interval: float = 3.0
    prefill_latency: float = 0.0  # seconds a prefill leg (or a plain request's prompt) takes
    token_latency: float = 0.0  # seconds per generated token
    max_model_len: int = 4096  # in "tokens" (whitespace-separated words)
    default_max_tokens: int = 16  # when a request gives neither max_tokens nor ..._completion_
    defer_timeout: float = 60.0  # kv_connector_extra_config defer_timeout: P reaps held blocks
    transfer_timeout: float = 30.0  # handshake / READ wait before giving up (garbage answer)
    block_size: int = 16  # tokens per KV block (--block-size)
    max_leg_records: int = 100_000  # bound on SimInstance.legs for long benchmark runs
    # Fault injection. /sim/faults and /sim/stats are always served on the HTTP port; with
    # control_port set (0 = pick a free port) ALSO on this port, which refuse_connections
    # leaves open.
    control_port: int | None = None
    seed: int | None = None  # seeds SimFaults.probability draws, so runs repeat
    faults: SimFaults = field(default_factory=SimFaults)  # initial faults (copied at init)


@dataclass
class SimStats:
    """Counters a test or benchmark reads to see what the engine really did."""

    requests: int = 0  # generation HTTP requests received
    completed: int = 0  # answered 200 to the end
    cancelled: int = 0  # client closed the connection mid-request
    errors_4xx: int = 0
    errors_5xx: int = 0  # engine dead / shutting down
    per_rank: dict[int, int] = field(default_factory=dict)  # engine requests per DP rank
    kv_reads_served: int = 0  # P, READ: KV reads answered with valid KV
    kv_writes_sent: int = 0  # P, WRITE: KV writes delivered
    kv_received: int = 0  # D: decode legs that got KV (read or written)
    garbage_outputs: int = 0  # D: answers computed without valid KV
    kv_wait_cancelled: int = 0  # D, WRITE: cancelled while waiting for KV (0.32 leaks blocks)
    blocks_reaped: int = 0  # P: held blocks freed by defer_timeout (nobody took the KV)
    # Injected faults by kind: "status", "die_after_tokens", "stall_first_byte",
    # "stall_after_tokens" (per request, when they actually happen) and
    # "refuse_connections" (each time the listener is closed).
    faults_applied: dict[str, int] = field(default_factory=dict)


@dataclass
class LegRecord:
    """One generation HTTP request as the engine saw it (tests assert on what the proxy sent)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None = None
    dp_rank: int | None = None  # rank of the first engine request of this HTTP request
    kind: str = "invalid"  # "prefill" | "decode" | "plain" | "invalid"
    transfer_id: str | None = None  # the id the connector mapped (may be "sidecar-...")
    request_id: str | None = None  # vLLM's internal request id (first choice)
    started: bool = False  # passed validation; the engine began working on it
    finished: bool = False  # the answer was sent completely
    cancelled: bool = False  # the client went away first
    garbage: bool = False  # some choice was computed without valid KV
    status: int | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    faults: list[str] = field(default_factory=list)  # injected fault kinds applied to this leg


# --------------------------------------------------------------------------------------
# The toy model
# --------------------------------------------------------------------------------------


def normalize_prompt(text: str) -> str:
    """Collapse whitespace: the sim's tokenizer only sees whitespace-separated words."""
    return " ".join(text.split())


def chat_prompt_text(messages: list[dict[str, Any]]) -> str:
    """The prompt text the sim's "chat template" renders: ``"<role>: <content>\\n"`` per message.

    Public so tests can compute ``expected_text(chat_prompt_text(messages), n)``.
    """
    parts: list[str] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        parts.append(f"{msg.get('role', '')}: {content}\n")
    return "".join(parts)


def kv_fingerprint(prompt_text: str) -> str:
    """What the simulated KV cache "contains" after a prefill of this prompt."""
    return hashlib.sha256(normalize_prompt(prompt_text).encode("utf-8")).hexdigest()


def _words(seed: str, n: int, vocab: tuple[str, ...]) -> list[str]:
    """Deterministic greedy "sampling": word k depends only on (seed, k)."""
    out: list[str] = []
    for k in range(n):
        digest = hashlib.sha256(f"{seed}:{k}".encode()).digest()
        out.append(vocab[int.from_bytes(digest[:4], "big") % len(vocab)])
    return out


def expected_text(prompt_text: str, n_tokens: int) -> str:
    """What a correct engine outputs for ``prompt_text`` after exactly ``n_tokens`` tokens.

    Each token is ``" " + word``; the concatenation of streamed chunks equals this string.
    """
    return "".join(" " + w for w in _words(kv_fingerprint(prompt_text), n_tokens, _VOCAB))


def _garbage_seed(prompt_text: str) -> str:
    return "garbage:" + kv_fingerprint(prompt_text)


@dataclass
class _Plan:
    """The complete output of one engine request, computed up front (it is deterministic)."""

    deltas: list[str]  # streamed text per generated token (stop-string hold-back applied)
    text: str
    n_tokens: int
    finish_reason: str
    stop_reason: str | None
    length_capped: bool  # scheduler status FINISHED_LENGTH_CAPPED (decides kv_transfer_params)


def _plan_output(
    seed: str,
    vocab: tuple[str, ...],
    max_tokens: int,
    min_tokens: int,
    stops: list[str],
    include_stop: bool,
    eos: bool,
) -> _Plan:
    """Generate like vLLM 0.32's scheduler + detokenizer would.

    * EOS is checked before the length cap (v1/core/sched/utils.py check_stop), so an EOS
      first token finishes "stop" and is never length-capped; its text is empty but it
      counts as one completion token.
    * The length cap is decided by the scheduler; stop strings are found later by the
      detokenizer (v1/engine/detokenizer.py update): only once more than ``min_tokens`` tokens
      exist, searching text after the first ``min_tokens`` tokens. A stop string completing
      on the last allowed token therefore still leaves the request FINISHED_LENGTH_CAPPED
      (kv_transfer_params returned); one completing earlier aborts it (params null).
    * Streaming holds back ``max(len(stop)) - 1`` characters until the end, like vLLM.
    """
    if eos:
        return _Plan([""], "", 1, "stop", None, False)
    pieces = [" " + w for w in _words(seed, max_tokens, vocab)]
    stops = [s for s in stops if s]
    text = ""
    ends: list[int] = []
    final_text: str | None = None
    n_tokens = max_tokens
    finish_reason = "length"
    stop_reason: str | None = None
    length_capped = True
    for k, piece in enumerate(pieces, start=1):
        text += piece
        ends.append(len(text))
        if not stops or k <= min_tokens:
            continue
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in stops:
            start = text.find(s, max(0, len(text) + 1 - len(piece) - len(s)))
            if start != -1 and (best is None or start + len(s) < best[0]):
                best = (start + len(s), start, s)
        if best is not None:
            end, start, s = best
            final_text = text[:end] if include_stop else text[:start]
            n_tokens = k
            finish_reason = "stop"
            stop_reason = s
            length_capped = k == max_tokens
            break
    if final_text is None:
        final_text = text
    hold_back = max((len(s) for s in stops), default=1) - 1 if not include_stop else 0
    deltas: list[str] = []
    emitted = 0
    for j in range(n_tokens):
        last = j == n_tokens - 1
        visible = len(final_text) if last else min(len(final_text), ends[j] - hold_back)
        visible = max(visible, emitted)
        deltas.append(final_text[emitted:visible])
        emitted = visible
    return _Plan(deltas, final_text, n_tokens, finish_reason, stop_reason, length_capped)


# --------------------------------------------------------------------------------------
# Connector facts (vLLM 0.32 moriio_common.py / moriio_connector.py), re-implemented
# --------------------------------------------------------------------------------------


class _Fatal(Exception):
    """Raised where the real connector raises inside EngineCore: the whole engine dies."""


class _BadRequest(Exception):
    """A request vLLM's API server rejects before it reaches the engine."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        err_type: str = "BadRequestError",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type


def _parse_zmq_address(zmq_address: str) -> tuple[str, int, int]:
    """``"host:IP,handshake:PORT,notify:PORT"``, each segment split on its first colon.

    Raises ValueError like 0.32's parse_moriio_zmq_address (moriio_common.py:439).
    """
    parts: dict[str, str] = {}
    for segment in zmq_address.split(","):
        key, _, val = segment.partition(":")
        parts[key.strip()] = val.strip()
    try:
        return parts["host"], int(parts["handshake"]), int(parts["notify"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Malformed zmq_address {zmq_address!r}: expected "
            "'host:IP,handshake:PORT,notify:PORT' format"
        ) from e


def _peer_zmq_from_request_id(request_id: str, is_producer: bool) -> str | None:
    """The producer looks for the decode address, the consumer for the prefill address."""
    m = (_DECODE_ZMQ_RE if is_producer else _PREFILL_ZMQ_RE).search(request_id)
    return None if m is None else m.group(1)


def _port_offset(dp_rank: int, tp_rank: int, tp_size: int = 1) -> int:
    """0.32 get_port_offset. Note most 0.32 call sites omit tp_size (so: dp_rank + tp_rank)."""
    return dp_rank * tp_size + tp_rank


@dataclass
class _ReqMeta:
    """What 0.32's add_new_req extracts from kv_transfer_params (ReqMeta)."""

    transfer_id: Any
    remote_host: str
    remote_handshake_port: int
    remote_notify_port: int
    remote_dp_size_local: int
    remote_dp_size: Any
    remote_dp_rank: Any
    remote_block_ids: Any
    tp_size: int


def _add_new_req(request_id: str, kv: dict[str, Any], write_mode: bool) -> _ReqMeta:
    """0.32 MoRIIOConnectorMetadata.add_new_req (moriio_common.py:535-635).

    Runs in the scheduler's build_connector_meta: every exception here kills EngineCore,
    so each is turned into _Fatal with a sentence naming the cause.
    """
    where = "WRITE-mode prefill leg" if write_mode else "READ-mode decode leg"
    if "transfer_id" not in kv:  # unreachable after update_state_after_alloc's setdefault
        raise _Fatal(f"{where}: kv_transfer_params has no 'transfer_id' key (KeyError)")
    peer = _peer_zmq_from_request_id(request_id, is_producer=write_mode)
    if peer is not None:
        try:
            host, hs_port, notify_port = _parse_zmq_address(peer)
        except ValueError as e:
            raise _Fatal(
                f"{where}: the X-Request-Id embeds a malformed peer zmq_address ({e})"
            ) from e
    else:
        try:
            host = kv["remote_host"]
            if not host:
                raise ValueError("kv_transfer_params['remote_host'] is empty")
            hs_port = int(kv["remote_handshake_port"])
            notify_port = int(kv["remote_notify_port"])
        except (KeyError, TypeError, ValueError) as e:
            raise _Fatal(
                f"{where}: request id {request_id!r} embeds no peer zmq_address and "
                "kv_transfer_params lacks a usable remote_host / remote_handshake_port / "
                f"remote_notify_port ({type(e).__name__}: {e})"
            ) from e
    try:
        dp_local = int(kv.get("remote_dp_size_local", kv.get("remote_dp_size", 1)))
    except (TypeError, ValueError) as e:
        raise _Fatal(
            f"{where}: remote_dp_size_local/remote_dp_size is not an integer "
            f"({type(e).__name__}: {e})"
        ) from e
    for key in ("remote_block_ids", "remote_engine_id"):
        if key not in kv:
            raise _Fatal(
                f"{where}: kv_transfer_params has no {key!r} key (KeyError in add_new_req; "
                "the key must exist, null is fine)"
            )
    try:
        tp = int(kv.get("remote_tp_size") or kv.get("tp_size") or 0)
    except (TypeError, ValueError) as e:
        raise _Fatal(f"{where}: remote_tp_size/tp_size is not an integer ({e})") from e
    return _ReqMeta(
        transfer_id=kv["transfer_id"],
        remote_host=str(host),
        remote_handshake_port=hs_port,
        remote_notify_port=notify_port,
        remote_dp_size_local=dp_local,
        remote_dp_size=kv.get("remote_dp_size", 1),
        remote_dp_rank=kv.get("remote_dp_rank", 0),
        remote_block_ids=kv["remote_block_ids"],
        tp_size=tp,
    )


def _endpoint(host: str, port: int) -> str:
    """A ZMQ tcp endpoint; IPv6 hosts are bracketed."""
    if ":" in host and not host.startswith("["):
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def _is_ipv6(host: str) -> bool:
    return ":" in host


# --------------------------------------------------------------------------------------
# Engine-internal state
# --------------------------------------------------------------------------------------


@dataclass
class _Registration:
    """KV blocks a prefill leg holds for a transfer until read/written/released/reaped."""

    transfer_id: str
    block_ids: list[int]
    fingerprint: str | None = None  # None until the prefill has computed the KV
    timer: asyncio.TimerHandle | None = None


@dataclass
class _WriteTask:
    """P, WRITE: KV waiting for the decode's "blocks ready" notify (0.32 MoRIIOWriter)."""

    key: Any  # kv_transfer_params["transfer_id"] as the writer sees it
    reg_key: str  # the transfer id the scheduler mapped (frees the registration)
    fingerprint: str
    dest_host: str
    dest_notify_base: int
    dest_handshake_base: int
    dp_local: int
    tp_meta: int
    timer: asyncio.TimerHandle | None = None


@dataclass
class _RemoteAlloc:
    """P, WRITE: a decode's "remote_blocks" notify (0.32 RemoteAllocInfo)."""

    decode_rank: Any
    block_ids: list[Any]


@dataclass
class _RankState:
    """One DP rank's engine: its own KV memory, notify and handshake sockets."""

    rank: int
    notify_sock: zmq.asyncio.Socket
    handshake_sock: zmq.asyncio.Socket
    registrations: dict[str, _Registration] = field(default_factory=dict)
    write_tasks: dict[Any, _WriteTask] = field(default_factory=dict)
    remote_alloc: dict[Any, _RemoteAlloc] = field(default_factory=dict)
    terminal: OrderedDict[Any, None] = field(default_factory=OrderedDict)
    write_waiters: dict[Any, asyncio.Future[Any]] = field(default_factory=dict)
    unmatched_writes: dict[Any, Any] = field(default_factory=dict)


@dataclass
class _Choice:
    """One engine request (vLLM splits an HTTP request per prompt and per n)."""

    index: int
    prompt_idx: int
    words: list[str]
    text: str  # normalized prompt text
    engine_id: str  # vLLM's internal request id, what the connector parses
    rank: int
    max_tokens: int
    kv: dict[str, Any] | None
    rec: LegRecord


@dataclass
class _Spec:
    """Per-HTTP-request generation settings."""

    chat: bool
    stream: bool
    resp_id: str
    created: int
    model: str
    min_tokens: int
    stops: list[str]
    include_stop: bool
    include_usage: bool
    continuous_usage: bool
    prompt_lens: list[int]


@dataclass
class _Event:
    """A generated token (or the end) of one choice, from engine task to HTTP handler."""

    index: int
    delta: str
    n_tokens: int
    finish_reason: str | None = None
    stop_reason: str | None = None
    kv_params: dict[str, Any] | None = None
    final: bool = False


def _error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _error_type(status: int) -> str:
    """vLLM-style error type for a status: 503 -> ServiceUnavailableError, 500 ->
    InternalServerError, 429 -> TooManyRequestsError."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError" if status >= 500 else "BadRequestError"
    name = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", phrase) if w)
    return name if name.endswith("Error") else name + "Error"


@dataclass
class _ReqFault:
    """The faults one generation request drew (a snapshot: later changes do not affect it)."""

    status: int | None
    stall_first_byte: float | None
    die_after: int | None
    stall_after: tuple[int, float] | None
    stalled: bool = False
    buffer: deque[Any] = field(default_factory=deque)  # events that arrived during a stall


class _ConnectionCut(Exception):
    """die_after_tokens fired: the connection is closed, the handler must end silently."""


# --------------------------------------------------------------------------------------
# The instance
# --------------------------------------------------------------------------------------


class SimInstance:
    """One simulated ``vllm serve`` process with MoRIIOConnector (all DP ranks of it)."""

    def __init__(self, config: SimConfig) -> None:
        if config.role not in ("P", "D"):
            raise ValueError(f"role must be 'P' or 'D', got {config.role!r}")
        if config.mode not in ("READ", "WRITE"):
            raise ValueError(f"mode must be 'READ' or 'WRITE', got {config.mode!r}")
        if config.dp_size < 1 or config.tp_size < 1:
            raise ValueError("dp_size and tp_size must be >= 1")
        if config.control_port is not None and not 0 <= config.control_port <= 65535:
            raise ValueError(f"control_port must be 0-65535, got {config.control_port!r}")
        faults = copy.deepcopy(config.faults)
        faults.validate()
        self.config = config
        self.stats = SimStats()
        self.legs: list[LegRecord] = []
        self.dead_reason: str | None = None
        self.heartbeating = True
        self._faults = faults
        self._faults_changed = asyncio.Event()
        self._fault_rng = random.Random(config.seed)
        self._refusing = False  # the HTTP listener is closed by refuse_connections
        self._refuse_error: str | None = None  # why re-binding the HTTP port last failed
        self._site_lock = asyncio.Lock()
        self._busy: dict[Any, int] = {}  # HTTP connection -> requests in progress on it
        self._listener_task: asyncio.Task[None] | None = None
        self._control_runner: web.AppRunner | None = None
        self._control_port: int | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._runner_closed = False
        self._port = config.port
        self._hs_base = config.handshake_port
        self._notify_base = config.notify_port
        self._ranks: dict[int, _RankState] = {}
        self._listener_tasks: list[asyncio.Task[None]] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._death_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._engine_tasks: set[asyncio.Task[Any]] = set()
        self._queues: set[asyncio.Queue[Any]] = set()
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._handshaken: set[str] = set()
        self._rng = random.Random()
        self._rr = 0
        self._next_block = 1
        self._started = False
        self._stopped = False
        self._dead_event = asyncio.Event()
        self._tag = f"sim[{config.role}/{config.mode}]"

    # ---------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        """The HTTP port actually bound."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the OpenAI server, e.g. ``http://127.0.0.1:PORT``."""
        host = self.config.host
        if _is_ipv6(host):
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    @property
    def control_port(self) -> int | None:
        """The bound control port (``SimConfig.control_port``), or None when not configured."""
        return self._control_port

    @property
    def control_url(self) -> str | None:
        """Base URL of the always-on control listener (``/sim/*``), or None."""
        if self._control_port is None:
            return None
        host = f"[{self.config.host}]" if _is_ipv6(self.config.host) else self.config.host
        return f"http://{host}:{self._control_port}"

    @property
    def faults(self) -> SimFaults:
        """The live faults. Assign a new SimFaults (validated) or mutate its fields."""
        return self._faults

    @faults.setter
    def faults(self, value: SimFaults) -> None:
        if not isinstance(value, SimFaults):
            raise TypeError(f"faults must be a SimFaults, got {type(value).__name__}")
        value.validate()
        self._faults = value
        self._faults_changed.set()

    async def set_faults(self, faults: SimFaults | None = None, **changes: Any) -> SimFaults:
        """Replace the faults (``faults``) and/or change fields (``changes``), then wait
        until the HTTP listener matches ``refuse_connections``. Returns the live faults."""
        new = copy.deepcopy(faults) if faults is not None else copy.deepcopy(self._faults)
        known = {f.name for f in fields(SimFaults)}
        for key, value in changes.items():
            if key not in known:
                raise TypeError(f"unknown SimFaults field {key!r}")
            setattr(new, key, value)
        self.faults = new
        await self._sync_listener()
        return self._faults

    @property
    def refusing(self) -> bool:
        """True while the HTTP listener is closed by ``SimFaults.refuse_connections``."""
        return self._refusing

    def stats_dict(self) -> dict[str, Any]:
        """SimStats as JSON-ready data plus engine state (what ``GET /sim/stats`` returns)."""
        out = asdict(self.stats)
        out["per_rank"] = {str(k): v for k, v in self.stats.per_rank.items()}
        out.update(
            dead_reason=self.dead_reason,
            held_transfers=self.held_transfers(),
            pending_kv_waiters=self.pending_kv_waiters(),
            in_flight=len(self._queues),
            refusing=self._refusing,
            heartbeating=self.heartbeating,
            legs=len(self.legs),
        )
        return out

    @property
    def http_address(self) -> str:
        """``IP:PORT`` as 0.32 advertises it (an IPv6 host is NOT bracketed)."""
        return f"{self.config.host}:{self._port}"

    @property
    def zmq_address(self) -> str:
        """``host:IP,handshake:BASE,notify:BASE`` (rank 0's ports are the bases)."""
        return f"host:{self.config.host},handshake:{self._hs_base},notify:{self._notify_base}"

    @property
    def handshake_base(self) -> int:
        return self._hs_base

    @property
    def notify_base(self) -> int:
        return self._notify_base

    def registration(self) -> dict[str, Any]:
        """The exact heartbeat map vLLM 0.32 sends (moriio_connector.py _start_heartbeat)."""
        return {
            "type": self.config.role,
            "http_address": self.http_address,
            "zmq_address": self.zmq_address,
            "dp_size": self.config.dp_size,
            "tp_size": self.config.tp_size,
            "transfer_mode": self.config.mode,
        }

    def held_transfers(self) -> int:
        """KV registrations P still holds (blocks not yet read/written/released/reaped)."""
        return sum(len(st.registrations) for st in self._ranks.values())

    def pending_kv_waiters(self) -> int:
        """D, WRITE: decode requests currently waiting for a KV write."""
        return sum(len(st.write_waiters) for st in self._ranks.values())

    async def wait_dead(self) -> str:
        """Wait until the simulated engine dies; returns the reason."""
        await self._dead_event.wait()
        return self.dead_reason or ""

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> SimInstance:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind ZMQ (notify + handshake per DP rank) and HTTP, start the heartbeat."""
        if self._started:
            return
        self._started = True
        cfg = self.config
        if cfg.dp_size > 1 and cfg.tp_size > 1:
            logger.warning(
                "%s dp_size>1 with tp_size>1: real vLLM 0.32 binds base+dp_rank+tp_rank, "
                "so these ports collide; the sim binds tp_rank 0 only",
                self._tag,
            )
        self._ctx = zmq.asyncio.Context()
        try:
            self._notify_base, notify_socks = self._bind_group(cfg.notify_port)
            self._hs_base, hs_socks = self._bind_group(cfg.handshake_port)
            for r in range(cfg.dp_size):
                self._ranks[r] = _RankState(r, notify_socks[r], hs_socks[r])
            app = web.Application(
                client_max_size=64 * 1024 * 1024, middlewares=[self._connection_middleware]
            )
            app.router.add_post("/v1/completions", self._handle_completions)
            app.router.add_post("/v1/chat/completions", self._handle_chat)
            app.router.add_get("/v1/models", self._handle_models)
            app.router.add_get("/health", self._handle_health)
            self._add_control_routes(app)
            self._runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await self._runner.setup()
            self._site = web.TCPSite(self._runner, cfg.host, cfg.port)
            await self._site.start()
            self._port = self._bound_port(self._site, cfg.port)
            if cfg.control_port is not None:
                control = web.Application()
                self._add_control_routes(control)
                self._control_runner = web.AppRunner(control, access_log=None, shutdown_timeout=1.0)
                await self._control_runner.setup()
                control_site = web.TCPSite(self._control_runner, cfg.host, cfg.control_port)
                await control_site.start()
                self._control_port = self._bound_port(control_site, cfg.control_port)
            await self._sync_listener()  # refuse_connections from the start
        except BaseException:
            await self._close_all()
            raise
        for st in self._ranks.values():
            self._listener_tasks.append(asyncio.ensure_future(self._notify_loop(st)))
            self._listener_tasks.append(asyncio.ensure_future(self._handshake_loop(st)))
        self._listener_task = asyncio.ensure_future(self._watch_listener())
        if cfg.proxy:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeat_loop(cfg.proxy))
        logger.info(
            "%s started url=%s zmq_address=%s dp=%d tp=%d",
            self._tag,
            self.url,
            self.zmq_address,
            cfg.dp_size,
            cfg.tp_size,
        )

    @staticmethod
    def _bound_port(site: web.TCPSite, port: int) -> int:
        server = site._server
        if port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            return int(sockets[0].getsockname()[1])
        return port

    def _bind_group(self, base: int) -> tuple[int, list[zmq.asyncio.Socket]]:
        """Bind dp_size consecutive ROUTERs at base+rank (0.32: base + get_port_offset).

        With base 0, pick a random base below the ephemeral range and retry on conflicts:
        binding is the only race-free test that the ports are free.
        """
        assert self._ctx is not None
        n = self.config.dp_size
        attempts = 1 if base else 200
        last_error: Exception | None = None
        for _ in range(attempts):
            b = base or self._rng.randint(_AUTO_PORT_LOW, _AUTO_PORT_HIGH - n)
            socks: list[zmq.asyncio.Socket] = []
            try:
                for r in range(n):
                    sock = self._ctx.socket(zmq.ROUTER)
                    sock.setsockopt(zmq.LINGER, 0)
                    if _is_ipv6(self.config.host):
                        sock.setsockopt(zmq.IPV6, 1)
                    socks.append(sock)
                    sock.bind(_endpoint(self.config.host, b + r))
                return b, socks
            except zmq.ZMQError as e:
                last_error = e
                for s in socks:
                    s.close(linger=0)
        raise OSError(f"{self._tag}: cannot bind {n} ports from base {base}: {last_error}")

    async def stop(self) -> None:
        """Idempotent: answer in-flight requests, cancel tasks, close HTTP and ZMQ."""
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            return
        self._broadcast(_SHUTDOWN)
        if self._death_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._death_task
        await self._close_all()
        logger.info("%s stopped", self._tag)

    async def _close_all(self) -> None:
        tasks = [*self._engine_tasks, *self._tasks, *self._listener_tasks]
        if self._heartbeat_task is not None:
            tasks.append(self._heartbeat_task)
        if self._listener_task is not None:
            tasks.append(self._listener_task)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for st in self._ranks.values():
            for reg in st.registrations.values():
                if reg.timer is not None:
                    reg.timer.cancel()
            for task in st.write_tasks.values():
                if task.timer is not None:
                    task.timer.cancel()
            for fut in st.write_waiters.values():
                fut.cancel()
        if self._runner is not None and not self._runner_closed:
            self._runner_closed = True
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
        if self._control_runner is not None:
            runner, self._control_runner = self._control_runner, None
            with contextlib.suppress(Exception):
                await runner.cleanup()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A background task owned by this instance (cancelled by stop())."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _broadcast(self, signal_: _Signal) -> None:
        for q in list(self._queues):
            q.put_nowait(signal_)

    # ---------------------------------------------------------------- engine death

    def _die(self, reason: str) -> None:
        """EngineCore died: fail in-flight requests, go silent, close the listeners.

        vLLM's API server exits when EngineCore dies, so the sim stops heartbeating and
        stops accepting connections; in-flight requests get a 500 (or an SSE error chunk).
        """
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("%s EngineCore died: %s", self._tag, reason)
        self._dead_event.set()
        self._broadcast(_DEAD)
        current = asyncio.current_task()
        for t in list(self._engine_tasks):
            if t is not current:
                t.cancel()
        self._death_task = asyncio.ensure_future(self._after_death())

    async def _after_death(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        async with self._site_lock:
            site, self._site = self._site, None
            if site is not None:
                with contextlib.suppress(Exception):
                    await site.stop()  # no new connections: "connection refused"
        for t in self._listener_tasks:
            t.cancel()
        await asyncio.gather(*self._listener_tasks, return_exceptions=True)
        for st in self._ranks.values():
            st.notify_sock.close(linger=0)
            st.handshake_sock.close(linger=0)
        # Let in-flight handlers write their 500s, then drop every connection like a
        # process exit would (keep-alive connections included).
        for _ in range(100):
            if not self._queues:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        if self._runner is not None and not self._runner_closed:
            self._runner_closed = True
            with contextlib.suppress(Exception):
                await self._runner.cleanup()

    # ---------------------------------------------------------------- heartbeat

    async def _heartbeat_loop(self, proxy: str) -> None:
        """0.32 moriio_heartbeat.py: DEALER, LINGER 0, SNDTIMEO 1 s, same map every interval.

        No HELLO, no goodbye; a send that would block is dropped with a warning. With no
        proxy listening the DEALER queues up to its HWM (1000), which a late proxy receives.
        """
        assert self._ctx is not None
        host, _, port = proxy.rpartition(":")
        if _is_ipv6(host) and not host.startswith("["):
            host = f"[{host}]"
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        if host.startswith("["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(f"tcp://{host}:{port}")
        try:
            while True:
                if self.heartbeating and self.dead_reason is None:
                    try:
                        await sock.send(msgpack.packb(self.registration()), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        logger.warning("%s discovery heartbeat send failed; retrying", self._tag)
                    except zmq.ZMQError:
                        logger.exception("%s discovery heartbeat send failed", self._tag)
                await asyncio.sleep(self.config.heartbeat_interval)
        finally:
            sock.close(linger=0)

    # ---------------------------------------------------------------- fault injection

    async def _watch_listener(self) -> None:
        """Apply refuse_connections changes: at once on assignment, else within a poll."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._faults_changed.wait(), _LISTENER_POLL)
            self._faults_changed.clear()
            try:
                await self._sync_listener()
            except Exception:
                logger.exception("%s cannot apply refuse_connections", self._tag)

    async def _sync_listener(self) -> None:
        """Close or re-open the HTTP listening socket to match ``faults.refuse_connections``."""
        async with self._site_lock:
            if (
                self._stopped
                or self.dead_reason is not None
                or self._runner is None
                or self._runner_closed
            ):
                return
            want = bool(self._faults.refuse_connections)
            if want and not self._refusing:
                self._refusing = True
                site, self._site = self._site, None
                if site is not None:
                    with contextlib.suppress(Exception):
                        await site.stop()
                # Keep-alive connections would still reach us: close the idle ones now and
                # the busy ones once their in-flight request is answered.
                server = self._runner.server
                for conn in server.connections if server is not None else []:
                    if conn in self._busy:
                        conn.close()
                    else:
                        conn.force_close()
                self._count_fault(None, "refuse_connections")
                logger.warning(
                    "%s fault: refusing HTTP connections on port %d (heartbeats continue)",
                    self._tag,
                    self._port,
                )
            elif not want and self._refusing:
                site = web.TCPSite(self._runner, self.config.host, self._port)
                try:
                    await site.start()
                except OSError as e:
                    with contextlib.suppress(Exception):
                        await site.stop()
                    if self._refuse_error != str(e):
                        self._refuse_error = str(e)
                        logger.error(
                            "%s cannot re-bind HTTP port %d (retrying): %s",
                            self._tag,
                            self._port,
                            e,
                        )
                    return
                self._site = site
                self._refusing = False
                self._refuse_error = None
                logger.warning("%s fault cleared: accepting HTTP connections again", self._tag)

    @web.middleware
    async def _connection_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Track busy connections; drop a request that slipped in while refusing."""
        conn = request.protocol
        if self._refusing:
            # A keep-alive connection accepted before the listener closed: behave like an
            # unreachable server (no response).
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        self._busy[conn] = self._busy.get(conn, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy.get(conn, 1) - 1
            if left > 0:
                self._busy[conn] = left
            else:
                self._busy.pop(conn, None)

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_get("/sim/faults", self._handle_get_faults)
        app.router.add_post("/sim/faults", self._handle_set_faults)
        app.router.add_patch("/sim/faults", self._handle_set_faults)
        app.router.add_get("/sim/stats", self._handle_stats)

    async def _handle_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults.to_dict())

    async def _handle_set_faults(self, request: web.Request) -> web.Response:
        """POST replaces the faults (omitted fields take defaults; ``{}`` clears them all);
        PATCH changes only the fields given. 400 on unknown keys or bad values."""
        try:
            raw = await request.read()
            data = json.loads(raw) if raw.strip() else {}
            base = self._faults if request.method == "PATCH" else None
            new = SimFaults.from_dict(data, base=base)
        except ValueError as e:
            return web.json_response(_error_body(str(e), "BadRequestError", 400), status=400)
        self.faults = new
        await self._sync_listener()
        return web.json_response(self._faults.to_dict())

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats_dict())

    def _count_fault(self, rec: LegRecord | None, kind: str) -> None:
        self.stats.faults_applied[kind] = self.stats.faults_applied.get(kind, 0) + 1
        if rec is not None:
            rec.faults.append(kind)

    def _draw_fault(self) -> _ReqFault | None:
        """One seeded draw per generation request while a per-request fault is configured."""
        f = self._faults
        if not f.per_request:
            return None
        try:
            f.validate()  # fields may have been mutated in place
        except ValueError as e:
            logger.error("%s invalid SimFaults, not applied: %s", self._tag, e)
            return None
        if self._fault_rng.random() >= f.probability:
            return None
        return _ReqFault(
            status=f.status,
            stall_first_byte=f.stall_first_byte,
            die_after=f.die_after_tokens,
            stall_after=f.stall_after_tokens,
        )

    def _status_fault(self, rec: LegRecord, status: int) -> web.Response:
        self._count_fault(rec, "status")
        self._finish(rec, status)
        logger.info("%s fault: answering %s with HTTP %d", self._tag, rec.request_id, status)
        return web.json_response(
            _error_body(
                f"Simulated fault: the server answered HTTP {status} (SimFaults.status).",
                _error_type(status),
                status,
            ),
            status=status,
        )

    async def _stall(
        self, queue: asyncio.Queue[Any], seconds: float, buffer: deque[Any] | None
    ) -> _Signal | None:
        """Stay silent for ``seconds`` (inf: until cancelled). Engine events arriving meanwhile
        go to ``buffer``; an engine death / shutdown ends the stall early (returned)."""
        loop = asyncio.get_running_loop()
        deadline = None if math.isinf(seconds) else loop.time() + seconds
        while True:
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                return None
            try:
                ev = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
            if isinstance(ev, _Signal):
                return ev
            if buffer is not None:
                buffer.append(ev)

    async def _next_event(self, queue: asyncio.Queue[Any], fault: _ReqFault | None) -> Any:
        if fault is not None and fault.buffer:
            return fault.buffer.popleft()
        return await queue.get()

    async def _fault_point(
        self,
        request: web.Request,
        rec: LegRecord,
        queue: asyncio.Queue[Any],
        fault: _ReqFault | None,
        tokens: int,
    ) -> None:
        """Called once ``tokens`` tokens have been handed out, before anything else is sent."""
        if fault is None:
            return
        if fault.stall_after is not None and not fault.stalled and tokens >= fault.stall_after[0]:
            fault.stalled = True
            self._count_fault(rec, "stall_after_tokens")
            logger.info(
                "%s fault: %s silent for %ss after %d tokens",
                self._tag,
                rec.request_id,
                fault.stall_after[1],
                tokens,
            )
            signal_ = await self._stall(queue, fault.stall_after[1], fault.buffer)
            if signal_ is not None:
                fault.buffer.appendleft(signal_)
        if fault.die_after is not None and tokens >= fault.die_after:
            self._count_fault(rec, "die_after_tokens")
            logger.info(
                "%s fault: cutting the connection of %s after %d tokens",
                self._tag,
                rec.request_id,
                tokens,
            )
            transport = request.transport
            if transport is not None:
                transport.close()  # flushes what was written, then FIN: no final chunk
            raise _ConnectionCut

    # ---------------------------------------------------------------- ZMQ plumbing

    async def _handshake_loop(self, st: _RankState) -> None:
        """Answer MoRI handshakes (GET_META_MSG) on handshake_base + rank."""
        sock = st.handshake_sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) >= 2 and frames[-1] == _GET_META_MSG:
                meta = {
                    "engine_id": f"{self.config.host}:{self._hs_base}",
                    "dp_rank": st.rank,
                    "role": self.config.role,
                }
                await sock.send_multipart([frames[0], b"", msgpack.packb(meta)])

    async def _notify_loop(self, st: _RankState) -> None:
        """The notify listener on notify_base + rank (0.32 MoRIIOWrapper._handle_message)."""
        sock = st.notify_sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            ident, msg = frames[0], frames[-1]
            try:
                data = msgpack.unpackb(msg, raw=False)
            except Exception:
                data = None
            if not isinstance(data, dict):
                logger.warning("%s rank %d: unhandled notify message %r", self._tag, st.rank, msg)
                continue
            try:
                reply = self._on_notify(st, data)
            except _ListenerDied as e:
                # 0.32 raises in the listener thread, which dies: this rank hears no more.
                logger.error(
                    "%s rank %d notify listener died: %s (0.32 behaviour; no more "
                    "notifications are processed on this rank)",
                    self._tag,
                    st.rank,
                    e,
                )
                return
            if reply is not None:
                await sock.send_multipart([ident, msgpack.packb(reply)])

    def _on_notify(self, st: _RankState, data: dict[str, Any]) -> dict[str, Any] | None:
        mtype = data.get("type")
        if mtype is None and "req_id" in data:
            mtype = "remote_blocks"
        tid = data.get("transfer_id")
        if mtype == "remote_blocks":  # D -> P (WRITE): "my blocks are ready, write there"
            if self.config.role != "P":
                raise _ListenerDied("only prefill can get block messages (AssertionError)")
            blocks = data.get("block_notify_list") or []
            if not blocks:
                raise _ListenerDied("block_notify_list cannot be empty in remote allocate message")
            if tid in st.terminal:
                return None
            st.remote_alloc[tid] = _RemoteAlloc(data.get("decode_rank", 0), list(blocks))
            if tid in st.write_tasks:
                self._spawn(self._do_write(st, tid))
            return None
        if mtype == "write_done":  # P -> D (WRITE): the KV is in your blocks
            if self.config.role != "D":
                raise _ListenerDied("only decode can get WRITE completion messages")
            fp = data.get("sim_fingerprint")
            fut = st.write_waiters.pop(tid, None)
            if fut is not None and not fut.done():
                fut.set_result(fp)
            else:  # 0.32 keeps unmatched completions (_unmatched_write_completions)
                st.unmatched_writes[tid] = fp
            return None
        if mtype == "release":  # D -> P: done with the KV (or never needed it)
            if self.config.role != "P":
                raise _ListenerDied("only prefill can get transfer release messages")
            self._mark_terminal(st, tid)
            st.remote_alloc.pop(tid, None)
            self._free_registration(st, tid)
            return None
        if mtype == "sim_read":  # D -> P (READ): stands in for the RDMA read of block ids
            return self._serve_read(st, data)
        logger.warning("%s rank %d: unhandled notify type %r", self._tag, st.rank, mtype)
        return None

    def _serve_read(self, st: _RankState, data: dict[str, Any]) -> dict[str, Any]:
        """An RDMA read addresses block ids in one rank's memory; the transfer_id is not used.

        So a read succeeds iff these exact block ids hold computed KV on this rank.
        """
        if self.config.role != "P":
            return {"ok": False, "error": "not a prefill instance"}
        wanted = data.get("block_ids")
        for reg in st.registrations.values():
            if reg.block_ids == wanted and reg.fingerprint is not None:
                self.stats.kv_reads_served += 1
                return {"ok": True, "fingerprint": reg.fingerprint}
        logger.warning(
            "%s rank %d: KV read of blocks %r (transfer %r) hits no computed KV: the decode "
            "will get garbage",
            self._tag,
            st.rank,
            wanted,
            data.get("transfer_id"),
        )
        return {"ok": False, "error": f"blocks {wanted!r} hold no KV on rank {st.rank}"}

    def _mark_terminal(self, st: _RankState, tid: Any) -> None:
        st.terminal[tid] = None
        st.terminal.move_to_end(tid)
        while len(st.terminal) > _MAX_TERMINAL_TRANSFERS:
            st.terminal.popitem(last=False)

    def _free_registration(self, st: _RankState, tid: Any) -> None:
        reg = st.registrations.pop(tid, None)
        if reg is not None and reg.timer is not None:
            reg.timer.cancel()

    def _start_defer_timer(self, st: _RankState, reg: _Registration) -> None:
        """0.32 request_finished: held blocks are force-freed after defer_timeout."""
        if reg.timer is not None:
            reg.timer.cancel()
        loop = asyncio.get_running_loop()
        reg.timer = loop.call_later(self.config.defer_timeout, self._reap, st, reg)

    def _reap(self, st: _RankState, reg: _Registration) -> None:
        if st.registrations.get(reg.transfer_id) is reg:
            del st.registrations[reg.transfer_id]
            self.stats.blocks_reaped += 1
            logger.warning(
                "%s rank %d: transfer %s not taken within defer_timeout=%.1fs; blocks %s freed",
                self._tag,
                st.rank,
                reg.transfer_id,
                self.config.defer_timeout,
                reg.block_ids,
            )

    def _dealer(self, host: str, port: int) -> zmq.asyncio.Socket:
        """A cached DEALER per peer path, like 0.32's ``self.paths``."""
        assert self._ctx is not None
        path = _endpoint(host, port)
        sock = self._dealers.get(path)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if _is_ipv6(host):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(path)
            self._dealers[path] = sock
        return sock

    async def _send_oneway(self, host: str, port: int, payload: dict[str, Any]) -> None:
        if self._ctx is None:
            return
        try:
            await self._dealer(host, port).send(msgpack.packb(payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.error("%s failed to send %s to %s:%s: %s", self._tag, payload, host, port, e)

    async def _request(self, host: str, port: int, frames: list[bytes]) -> list[bytes] | None:
        """Request/reply on a fresh DEALER; None after transfer_timeout (nobody answered)."""
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if _is_ipv6(host):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(_endpoint(host, port))
            await sock.send_multipart(frames)
            return await asyncio.wait_for(sock.recv_multipart(), self.config.transfer_timeout)
        except (asyncio.TimeoutError, zmq.ZMQError):
            return None
        finally:
            sock.close(linger=0)

    async def _handshake(self, host: str, port: int) -> bool:
        """MoRI handshake with a peer rank (cached on success, like 0.32's _remote_agents)."""
        path = _endpoint(host, port)
        if path in self._handshaken:
            return True
        reply = await self._request(host, port, [_GET_META_MSG])
        if reply is None or len(reply) != 2 or reply[0] != b"":
            logger.warning(
                "%s MoRIIO handshake with %s got no answer within %.1fs",
                self._tag,
                path,
                self.config.transfer_timeout,
            )
            return False
        self._handshaken.add(path)
        return True

    # ---------------------------------------------------------------- WRITE: P side

    def _expire_write(self, st: _RankState, task: _WriteTask) -> None:
        """0.32 MoRIIOWriter: a deferred write whose remote blocks never came expires."""
        if st.write_tasks.get(task.key) is task:
            del st.write_tasks[task.key]
            self._mark_terminal(st, task.key)
            self._free_registration(st, task.reg_key)
            logger.error(
                "%s rank %d: deferred write for transfer %r expired after %.1fs (remote "
                "blocks never arrived), marking done",
                self._tag,
                st.rank,
                task.key,
                self.config.defer_timeout,
            )

    async def _do_write(self, st: _RankState, key: Any) -> None:
        """Both the prefill's KV and the decode's notify are here: "RDMA-write" the KV.

        The target is the decode address P resolved from ITS OWN leg (request-id sandwich or
        remote_host/remote_notify_port), port + the decode rank from the notify message
        (0.32 _execute_write_task), followed by a write_done notify carrying the KV.
        """
        task = st.write_tasks.pop(key, None)
        alloc = st.remote_alloc.pop(key, None)
        if task is None or alloc is None:
            if task is not None:
                st.write_tasks[key] = task
            if alloc is not None:
                st.remote_alloc[key] = alloc
            return
        if task.timer is not None:
            task.timer.cancel()
        self._mark_terminal(st, key)
        try:
            try:
                decode_rank = int(alloc.decode_rank)
            except (TypeError, ValueError):
                logger.error(
                    "%s write task failed: bad decode_rank %r", self._tag, alloc.decode_rank
                )
                return
            port_rank = decode_rank % task.dp_local if task.dp_local > 0 else decode_rank
            hs_port = task.dest_handshake_base + _port_offset(port_rank, 0, task.tp_meta)
            if not await self._handshake(task.dest_host, hs_port):
                logger.error(
                    "%s write task for transfer %r failed (no handshake with the decode at "
                    "%s:%d), marking done: the decode will wait forever",
                    self._tag,
                    key,
                    task.dest_host,
                    hs_port,
                )
                return
            await self._send_oneway(
                task.dest_host,
                task.dest_notify_base + _port_offset(port_rank, 0),
                {"type": "write_done", "transfer_id": key, "sim_fingerprint": task.fingerprint},
            )
            self.stats.kv_writes_sent += 1
        finally:
            self._free_registration(st, task.reg_key)

    # ---------------------------------------------------------------- HTTP handlers

    async def _handle_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": self.config.model,
                        "parent": None,
                        "max_model_len": self.config.max_model_len,
                    }
                ],
            }
        )

    async def _handle_health(self, request: web.Request) -> web.Response:
        if self.dead_reason is not None:
            return web.Response(status=503)
        return web.Response(status=200)

    async def _handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, chat=False)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, chat=True)

    def _record(self, request: web.Request) -> LegRecord:
        rec = LegRecord(path=request.path, headers=dict(request.headers), started_at=time.time())
        if len(self.legs) >= self.config.max_leg_records:
            del self.legs[: len(self.legs) // 2]
        self.legs.append(rec)
        self.stats.requests += 1
        return rec

    def _finish(self, rec: LegRecord, status: int) -> None:
        rec.status = status
        rec.finished = True
        rec.finished_at = time.time()
        if status == 200:
            self.stats.completed += 1
        elif 400 <= status < 500:
            self.stats.errors_4xx += 1
        elif status >= 500:
            self.stats.errors_5xx += 1

    def _dead_message(self) -> str:
        return f"EngineCore died: {self.dead_reason}"

    def _fail_response(self, rec: LegRecord, signal_: Any) -> web.Response:
        if signal_ is _DEAD:
            self._finish(rec, 500)
            return web.json_response(
                _error_body(self._dead_message(), "InternalServerError", 500), status=500
            )
        self._finish(rec, 503)
        return web.json_response(
            _error_body("The server is shutting down.", "ServiceUnavailableError", 503),
            status=503,
        )

    async def _handle_generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rec = self._record(request)
        if self.dead_reason is not None:
            return self._fail_response(rec, _DEAD)
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise _BadRequest(f"JSON decode error: {e}") from e
            rec.body = body if isinstance(body, dict) else None
            spec, choices = self._prepare(request, body, chat, rec)
        except _BadRequest as e:
            self._finish(rec, e.status)
            return web.json_response(
                _error_body(e.message, e.err_type, e.status, e.param), status=e.status
            )
        fault = self._draw_fault()
        if fault is not None and fault.status is not None:
            return self._status_fault(rec, fault.status)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues.add(queue)
        tasks: list[asyncio.Task[Any]] = []
        try:
            if fault is not None and fault.stall_first_byte is not None:
                self._count_fault(rec, "stall_first_byte")
                logger.info(
                    "%s fault: %s silent for %ss before the first byte",
                    self._tag,
                    rec.request_id,
                    fault.stall_first_byte,
                )
                signal_ = await self._stall(queue, fault.stall_first_byte, None)
                if signal_ is not None:
                    return self._fail_response(rec, signal_)
            rec.started = True
            for ch in choices:
                t = asyncio.ensure_future(self._run_choice(ch, spec, queue))
                self._engine_tasks.add(t)
                t.add_done_callback(self._engine_tasks.discard)
                tasks.append(t)
            if spec.stream:
                return await self._respond_stream(request, rec, spec, choices, queue, fault)
            return await self._respond_json(request, rec, spec, choices, queue, fault)
        except _ConnectionCut:
            rec.finished_at = time.time()
            # End like a dropped connection: aiohttp writes nothing more.
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            self._mark_cancelled(rec)
            raise
        finally:
            self._queues.discard(queue)
            for t in tasks:
                t.cancel()

    def _mark_cancelled(self, rec: LegRecord) -> None:
        if not rec.cancelled and not rec.finished:
            rec.cancelled = True
            rec.finished_at = time.time()
            self.stats.cancelled += 1
            logger.info("%s request %s cancelled by the client", self._tag, rec.request_id)

    def _usage(self, spec: _Spec, completion_tokens: int) -> dict[str, int]:
        prompt = sum(spec.prompt_lens)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion_tokens,
            "completion_tokens": completion_tokens,
        }

    async def _respond_json(
        self,
        request: web.Request,
        rec: LegRecord,
        spec: _Spec,
        choices: list[_Choice],
        queue: asyncio.Queue[Any],
        fault: _ReqFault | None,
    ) -> web.Response:
        texts = {ch.index: "" for ch in choices}
        tokens = {ch.index: 0 for ch in choices}
        finals: dict[int, _Event] = {}
        seen = 0
        await self._fault_point(request, rec, queue, fault, seen)
        while len(finals) < len(choices):
            ev = await self._next_event(queue, fault)
            if isinstance(ev, _Signal):
                return self._fail_response(rec, ev)
            texts[ev.index] += ev.delta
            tokens[ev.index] = ev.n_tokens
            if ev.final:
                finals[ev.index] = ev
            seen += 1
            await self._fault_point(request, rec, queue, fault, seen)
        out_choices: list[dict[str, Any]] = []
        for ch in choices:
            fin = finals[ch.index]
            if spec.chat:
                out_choices.append(
                    {
                        "index": ch.index,
                        "message": {
                            "role": "assistant",
                            "content": texts[ch.index],
                            "reasoning_content": None,
                            "tool_calls": [],
                        },
                        "logprobs": None,
                        "finish_reason": fin.finish_reason,
                        "stop_reason": fin.stop_reason,
                    }
                )
            else:
                out_choices.append(
                    {
                        "index": ch.index,
                        "text": texts[ch.index],
                        "logprobs": None,
                        "finish_reason": fin.finish_reason,
                        "stop_reason": fin.stop_reason,
                        "prompt_logprobs": None,
                    }
                )
        usage: dict[str, Any] = self._usage(spec, sum(tokens.values()))
        usage["prompt_tokens_details"] = None
        body = {
            "id": spec.resp_id,
            "object": "chat.completion" if spec.chat else "text_completion",
            "created": spec.created,
            "model": spec.model,
            "choices": out_choices,
            "usage": usage,
            # 0.32 completion/serving.py: final_res_batch[0].kv_transfer_params
            "kv_transfer_params": finals[choices[0].index].kv_params,
        }
        if spec.chat:
            body["prompt_logprobs"] = None
        self._finish(rec, 200)
        return web.json_response(body)

    async def _respond_stream(
        self,
        request: web.Request,
        rec: LegRecord,
        spec: _Spec,
        choices: list[_Choice],
        queue: asyncio.Queue[Any],
        fault: _ReqFault | None,
    ) -> web.StreamResponse:
        # Headers go out before the engine runs (vLLM returns its generator first), so an
        # engine death after this point is a 200 followed by an SSE error chunk.
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        obj = "chat.completion.chunk" if spec.chat else "text_completion"

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": spec.resp_id,
                "object": obj,
                "created": spec.created,
                "model": spec.model,
                "choices": [choice],
            }

        try:
            await resp.prepare(request)
            seen = 0
            await self._fault_point(request, rec, queue, fault, seen)
            role_sent: set[int] = set()
            tokens = {ch.index: 0 for ch in choices}
            done: set[int] = set()
            while len(done) < len(choices):
                ev = await self._next_event(queue, fault)
                if isinstance(ev, _Signal):
                    if ev is _DEAD:
                        err = _error_body(self._dead_message(), "InternalServerError", 500)
                    else:
                        err = _error_body(
                            "The server is shutting down.", "ServiceUnavailableError", 503
                        )
                    await send(err)
                    await send("[DONE]")
                    await resp.write_eof()
                    self._finish(rec, 500 if ev is _DEAD else 503)
                    return resp
                tokens[ev.index] = ev.n_tokens
                seen += 1
                if spec.chat:
                    if ev.index not in role_sent:
                        role_sent.add(ev.index)
                        await send(
                            chunk(
                                {
                                    "index": ev.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            )
                        )
                    if not ev.delta and not ev.final:
                        await self._fault_point(request, rec, queue, fault, seen)
                        continue
                    c = chunk(
                        {
                            "index": ev.index,
                            "delta": {"content": ev.delta},
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                            "stop_reason": ev.stop_reason,
                        }
                    )
                else:
                    c = chunk(
                        {
                            "index": ev.index,
                            "text": ev.delta,
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                            "stop_reason": ev.stop_reason,
                        }
                    )
                if spec.continuous_usage:
                    prompt_len = spec.prompt_lens[_choice_by_index(choices, ev.index).prompt_idx]
                    c["usage"] = {
                        "prompt_tokens": prompt_len,
                        "total_tokens": prompt_len + ev.n_tokens,
                        "completion_tokens": ev.n_tokens,
                    }
                await send(c)
                if ev.final:
                    done.add(ev.index)
                await self._fault_point(request, rec, queue, fault, seen)
            if spec.include_usage:
                await send(
                    {
                        "id": spec.resp_id,
                        "object": obj,
                        "created": spec.created,
                        "model": spec.model,
                        "choices": [],
                        "usage": self._usage(spec, sum(tokens.values())),
                    }
                )
            await send("[DONE]")
            await resp.write_eof()
        except (ConnectionError, RuntimeError) as e:
            # The client went away while we were writing (aiohttp may not have cancelled
            # the handler yet).
            logger.debug("%s stream write failed: %r", self._tag, e)
            self._mark_cancelled(rec)
            return resp
        self._finish(rec, 200)
        return resp

    # ---------------------------------------------------------------- request parsing

    def _prepare(
        self, request: web.Request, body: Any, chat: bool, rec: LegRecord
    ) -> tuple[_Spec, list[_Choice]]:
        """Validate like vLLM 0.32's OpenAI server and split into engine requests."""
        cfg = self.config
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != cfg.model:
            raise _BadRequest(
                f"The model `{model}` does not exist.", status=404, err_type="NotFoundError"
            )
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _BadRequest("`stream` must be a boolean.", param="stream")
        if body.get("stream_options") and not stream:
            raise _BadRequest(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _BadRequest("`stream_options` must be an object.", param="stream_options")
        kv = body.get("kv_transfer_params")
        if kv is not None and not isinstance(kv, dict):
            raise _BadRequest("`kv_transfer_params` must be an object.")

        prompts = self._parse_prompts(body, chat)
        # online_renderer._reused_prompt_token_ids: a decode may reuse P's token ids.
        if isinstance(kv, dict) and "prompt_token_ids" in kv:
            kv = dict(kv)
            ids = kv.pop("prompt_token_ids")
            if ids is not None and not body.get("echo"):
                if (
                    not isinstance(ids, list)
                    or not ids
                    or any(type(x) is not int or x < 0 for x in ids)
                ):
                    raise _BadRequest(
                        "`kv_transfer_params['prompt_token_ids']` must be a non-empty list "
                        "of non-negative integers.",
                        param="kv_transfer_params.prompt_token_ids",
                    )
                prompts = [[str(x) for x in ids]]
        for words in prompts:
            if not words:
                raise _BadRequest("The decoder prompt cannot be empty")
            if len(words) > cfg.max_model_len:
                raise _BadRequest(
                    f"This model's maximum context length is {cfg.max_model_len} tokens. "
                    f"However, your prompt contains {len(words)} input tokens, which exceeds "
                    "this limit even without any output tokens. Please reduce the length of "
                    "the input prompt.",
                    param="input_tokens",
                )
            if len(words) == cfg.max_model_len:
                raise _BadRequest(
                    f"The decoder prompt (length {len(words)}) plus the number of requested "
                    f"output tokens (at least 1) is longer than the maximum model length of "
                    f"{cfg.max_model_len}."
                )

        n = body.get("n", 1)
        n = 1 if n is None else n
        if type(n) is not int or n < 1:
            raise _BadRequest("n must be at least 1.", param="n")
        if n > 1 and body.get("temperature") == 0:
            raise _BadRequest(f"n must be 1 when using greedy sampling, got {n}.")

        if chat and body.get("max_completion_tokens") is not None:
            requested, param = body.get("max_completion_tokens"), "max_completion_tokens"
        else:
            requested, param = body.get("max_tokens"), "max_tokens"
        if requested is None:
            requested = cfg.default_max_tokens
        if type(requested) is not int:
            raise _BadRequest(f"`{param}` must be an integer.", param=param)
        if requested > cfg.max_model_len:
            raise _BadRequest(
                f"{param}={requested} cannot be greater than max_model_len="
                f"{cfg.max_model_len}. Please request fewer output tokens.",
                param=param,
            )
        if requested < 1:
            raise _BadRequest(f"max_tokens must be at least 1, got {requested}.", param=param)
        min_tokens = body.get("min_tokens", 0)
        min_tokens = 0 if min_tokens is None else min_tokens
        if type(min_tokens) is not int or min_tokens < 0:
            raise _BadRequest(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise _BadRequest("`stop` must be a string or a list of strings.", param="stop")

        # get_max_tokens (serve/utils/api_utils.py): clamp to the context left, no error.
        per_prompt_max = [min(requested, cfg.max_model_len - len(w)) for w in prompts]
        for mt in per_prompt_max:
            if min_tokens > mt:
                raise _BadRequest(
                    f"min_tokens must be less than or equal to max_tokens={mt}, got {min_tokens}."
                )

        rank: int | None = None
        header = request.headers.get("X-data-parallel-rank")
        if header is not None:
            try:
                rank = int(header)
            except ValueError:
                rank = None  # 0.32 _get_data_parallel_rank: silently ignored
            if rank is not None and not 0 <= rank < cfg.dp_size:
                raise _BadRequest(f"data_parallel_rank {rank} is out of range [0, {cfg.dp_size}).")

        base_id = request.headers.get("X-Request-Id")
        if base_id is None:
            base_id = uuid.uuid4().hex
        resp_id = ("chatcmpl-" if chat else "cmpl-") + base_id
        spec = _Spec(
            chat=chat,
            stream=bool(stream),
            resp_id=resp_id,
            created=int(time.time()),
            model=cfg.model,
            min_tokens=min_tokens,
            stops=stops,
            include_stop=bool(body.get("include_stop_str_in_output", False)),
            include_usage=bool(stream) and bool(stream_options.get("include_usage")),
            continuous_usage=bool(stream)
            and bool(stream_options.get("include_usage"))
            and bool(stream_options.get("continuous_usage_stats")),
            prompt_lens=[len(w) for w in prompts],
        )
        choices: list[_Choice] = []
        for p_idx, words in enumerate(prompts):
            sub_id = resp_id if chat and len(prompts) == 1 else f"{resp_id}-{p_idx}"
            for j in range(n):
                engine_id = f"{sub_id}-{uuid.uuid4().hex[:8]}"
                if n > 1:
                    engine_id = f"{j}_{engine_id}"
                choices.append(
                    _Choice(
                        index=p_idx * n + j,
                        prompt_idx=p_idx,
                        words=words,
                        text=" ".join(words),
                        engine_id=engine_id,
                        rank=rank if rank is not None else self._next_rank(),
                        max_tokens=per_prompt_max[p_idx],
                        kv=copy.deepcopy(kv) if kv is not None else None,
                        rec=rec,
                    )
                )
        rec.dp_rank = choices[0].rank
        rec.request_id = choices[0].engine_id
        rec.kind = self._kind(kv)
        if len(choices) > 1 and kv:
            logger.warning(
                "%s %d engine requests share one kv_transfer_params (multi-prompt or n>1): "
                "their transfers collide, as in vLLM 0.32",
                self._tag,
                len(choices),
            )
        return spec, choices

    def _parse_prompts(self, body: dict[str, Any], chat: bool) -> list[list[str]]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("Field required: `messages`", param="messages")
            if not all(isinstance(m, dict) for m in messages):
                raise _BadRequest("Each message must be an object.", param="messages")
            return [chat_prompt_text(messages).split()]
        prompt = body.get("prompt")
        if prompt is None:
            raise _BadRequest("Field required: `prompt`", param="prompt")
        if isinstance(prompt, str):
            return [prompt.split()]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [p.split() for p in prompt]
            if all(type(p) is int for p in prompt):
                return [[str(p) for p in prompt]]
            if all(isinstance(p, list) and all(type(x) is int for x in p) for p in prompt):
                return [[str(x) for x in p] for p in prompt]
        raise _BadRequest(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of "
            "token id lists.",
            param="prompt",
        )

    def _kind(self, kv: dict[str, Any] | None) -> str:
        if kv and self.config.role == "P" and kv.get("do_remote_decode"):
            return "prefill"
        if kv and self.config.role == "D" and kv.get("do_remote_prefill"):
            return "decode"
        return "plain"

    def _next_rank(self) -> int:
        """The engine's own DP load balancing when no X-data-parallel-rank pins a rank."""
        r = self._rr % self.config.dp_size
        self._rr += 1
        return r

    def _alloc_blocks(self, n_tokens: int) -> list[int]:
        n = max(1, math.ceil(n_tokens / self.config.block_size))
        ids = list(range(self._next_block, self._next_block + n))
        self._next_block += n
        return ids

    # ---------------------------------------------------------------- engine requests

    async def _run_choice(self, ch: _Choice, spec: _Spec, queue: asyncio.Queue[Any]) -> None:
        self.stats.per_rank[ch.rank] = self.stats.per_rank.get(ch.rank, 0) + 1
        try:
            kind = self._kind(ch.kv)
            if kind == "prefill":
                await self._prefill_leg(ch, spec, queue)
            elif kind == "decode" and self.config.mode == "READ":
                await self._read_decode_leg(ch, spec, queue)
            elif kind == "decode":
                await self._write_decode_leg(ch, spec, queue)
            else:
                await self._plain(ch, spec, queue)
        except _Fatal as e:
            self._die(str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("%s simulator bug", self._tag)
            self._die(f"simulator internal error: {e!r}")

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds if seconds > 0 else 0)

    def _plan(self, ch: _Choice, spec: _Spec, seed: str, garbage: bool) -> _Plan:
        return _plan_output(
            seed,
            _GARBAGE_VOCAB if garbage else _VOCAB,
            ch.max_tokens,
            spec.min_tokens,
            spec.stops,
            spec.include_stop,
            EOS_MARKER in ch.text,
        )

    async def _emit(
        self,
        ch: _Choice,
        plan: _Plan,
        queue: asyncio.Queue[Any],
        on_finish: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """Hand tokens to the HTTP handler, token_latency apart; the last one carries the end."""
        last = len(plan.deltas) - 1
        for j, delta in enumerate(plan.deltas):
            await self._sleep(self.config.token_latency)
            if j < last:
                queue.put_nowait(_Event(ch.index, delta, j + 1))
                continue
            kv_params = on_finish() if on_finish is not None else None
            queue.put_nowait(
                _Event(
                    ch.index,
                    delta,
                    j + 1,
                    plan.finish_reason,
                    plan.stop_reason,
                    kv_params,
                    final=True,
                )
            )

    def _garbage(self, ch: _Choice, why: str) -> str:
        self.stats.garbage_outputs += 1
        ch.rec.garbage = True
        logger.warning(
            "%s request %s: answer computed WITHOUT valid KV (%s): output is garbage",
            self._tag,
            ch.engine_id,
            why,
        )
        return _garbage_seed(ch.text)

    async def _plain(self, ch: _Choice, spec: _Spec, queue: asyncio.Queue[Any]) -> None:
        """No transfer. On a READ-mode consumer the prompt is still counted as external.

        0.32 get_num_new_matched_tokens (READ) returns len(prompt)-1 external tokens without
        looking at do_remote_prefill, so all but the last prompt token are never computed.
        """
        await self._sleep(self.config.prefill_latency)
        if ch.kv and self.config.role == "D" and ch.kv.get("do_remote_decode"):
            logger.warning("%s a prefill leg (do_remote_decode) was sent to a consumer", self._tag)
        if self.config.role == "D" and self.config.mode == "READ" and len(ch.words) > 1:
            plan = self._plan(
                ch, spec, self._garbage(ch, "request without KV to a READ-mode consumer"), True
            )
        else:
            plan = self._plan(ch, spec, kv_fingerprint(ch.text), False)
        await self._emit(ch, plan, queue)

    @staticmethod
    def _adopt_transfer_id(ch: _Choice) -> str:
        """update_state_after_alloc (0.32): the leg's transfer_id, or ``sidecar-<id>``,
        which the other leg can never match (so a WRITE decode then waits forever)."""
        assert ch.kv is not None
        tid = ch.kv.get("transfer_id") or f"sidecar-{ch.engine_id}"
        ch.kv.setdefault("transfer_id", tid)
        ch.rec.transfer_id = tid
        return tid

    async def _prefill_leg(self, ch: _Choice, spec: _Spec, queue: asyncio.Queue[Any]) -> None:
        """P with do_remote_decode: compute the KV, hold the blocks, answer with params."""
        assert ch.kv is not None
        kv = ch.kv
        st = self._ranks[ch.rank]
        tid = self._adopt_transfer_id(ch)
        write_meta: _ReqMeta | None = None
        write_dp_local = 0
        if self.config.mode == "WRITE":
            write_meta = _add_new_req(ch.engine_id, kv, write_mode=True)
            try:  # worker _write_blocks_for_req
                write_dp_local = (
                    int(write_meta.remote_dp_size_local)
                    if write_meta.remote_dp_size_local
                    else int(write_meta.remote_dp_size)
                )
            except (TypeError, ValueError) as e:
                raise _Fatal(
                    f"WRITE-mode prefill leg: remote_dp_size {write_meta.remote_dp_size!r} is "
                    f"not an integer ({e})"
                ) from e
        old = st.registrations.get(tid)
        if old is not None:
            logger.warning("%s rank %d: transfer_id %s reused", self._tag, st.rank, tid)
            self._free_registration(st, tid)
        reg = _Registration(tid, self._alloc_blocks(len(ch.words)))
        st.registrations[tid] = reg
        returned = False
        try:
            await self._sleep(self.config.prefill_latency)
            fp = kv_fingerprint(ch.text)
            reg.fingerprint = fp
            if write_meta is not None:
                key = kv["transfer_id"]
                task = _WriteTask(
                    key=key,
                    reg_key=tid,
                    fingerprint=fp,
                    dest_host=write_meta.remote_host,
                    dest_notify_base=write_meta.remote_notify_port,
                    dest_handshake_base=write_meta.remote_handshake_port,
                    dp_local=write_dp_local,
                    tp_meta=write_meta.tp_size,
                )
                if key not in st.terminal:
                    old_task = st.write_tasks.pop(key, None)
                    if old_task is not None and old_task.timer is not None:
                        old_task.timer.cancel()
                    task.timer = asyncio.get_running_loop().call_later(
                        self.config.defer_timeout, self._expire_write, st, task
                    )
                    st.write_tasks[key] = task
                    if key in st.remote_alloc:
                        self._spawn(self._do_write(st, key))
            plan = self._plan(ch, spec, fp, False)

            def on_finish() -> dict[str, Any] | None:
                nonlocal returned
                returned = True
                if not plan.length_capped:  # request_finished: (False, None), blocks freed
                    if st.registrations.get(tid) is reg:
                        self._free_registration(st, tid)
                    return None
                if st.registrations.get(tid) is reg:
                    self._start_defer_timer(st, reg)
                return self._returned_params(ch.rank, reg.block_ids, kv["transfer_id"])

            await self._emit(ch, plan, queue, on_finish)
        finally:
            if not returned and st.registrations.get(tid) is reg:
                self._free_registration(st, tid)  # aborted: request_finished frees now

    def _returned_params(self, rank: int, blocks: list[int], transfer_id: Any) -> dict[str, Any]:
        """0.32 request_finished's answer (moriio_connector.py:1510-1529)."""
        cfg = self.config
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(blocks)],
            "remote_engine_id": f"{cfg.host}:{self._hs_base}",
            "remote_host": cfg.host,
            "remote_handshake_port": str(self._hs_base),
            "remote_notify_port": str(self._notify_base),
            "remote_dp_rank": rank,
            "remote_dp_rank_override": True,
            "remote_dp_size": cfg.dp_size,
            "remote_dp_size_local": cfg.dp_size,
            "tp_size": cfg.tp_size,
            "transfer_id": transfer_id,
        }

    async def _read_decode_leg(self, ch: _Choice, spec: _Spec, queue: asyncio.Queue[Any]) -> None:
        """D, READ, do_remote_prefill: pull P's KV by block id, then decode from it."""
        assert ch.kv is not None
        kv = ch.kv
        self._adopt_transfer_id(ch)
        num_external = max(len(ch.words) - 1, 0)  # READ recomputes the last token locally
        meta: _ReqMeta | None = None
        remote_group: list[Any] | None = None
        why = ""
        # update_state_after_alloc, READ branch (moriio_connector.py:1004-1099)
        remote_block_ids = kv.get("remote_block_ids")
        if remote_block_ids:
            if "remote_engine_id" in kv:
                if num_external > 0:
                    remote_group = self._check_remote_groups(remote_block_ids)
                meta = _add_new_req(ch.engine_id, kv, write_mode=False)
            else:
                logger.warning(
                    "%s Got invalid KVTransferParams: %s. This request will not utilize KVTransfer",
                    self._tag,
                    kv,
                )
                why = "kv_transfer_params without a 'remote_engine_id' key"
        else:
            why = (
                f"remote_block_ids is {remote_block_ids!r} (0.32 then skips the transfer silently)"
            )
        read_rank: int | None = None
        if meta is not None:
            try:
                read_rank = int(meta.remote_dp_rank)
            except (TypeError, ValueError) as e:
                raise _Fatal(
                    f"READ-mode decode leg: remote_dp_rank {meta.remote_dp_rank!r} is not an "
                    f"integer (worker _read_blocks raises {type(e).__name__})"
                ) from e
        released = False
        try:
            await self._sleep(self.config.prefill_latency)
            fp: str | None = None
            if meta is not None and read_rank is not None:
                notify_port = meta.remote_notify_port + _port_offset(read_rank, 0, meta.tp_size)
                hs_port = meta.remote_handshake_port + _port_offset(read_rank, 0, meta.tp_size)
                if remote_group is not None:
                    if await self._handshake(meta.remote_host, hs_port):
                        reply = await self._request(
                            meta.remote_host,
                            notify_port,
                            [
                                msgpack.packb(
                                    {
                                        "type": "sim_read",
                                        "transfer_id": meta.transfer_id,
                                        "block_ids": remote_group,
                                    }
                                )
                            ],
                        )
                        fp, why = self._read_reply(reply, meta, notify_port)
                    else:
                        why = f"no handshake with {meta.remote_host}:{hs_port}"
                await self._send_oneway(
                    meta.remote_host,
                    notify_port,
                    {
                        "type": "release",
                        "transfer_id": meta.transfer_id,
                        "consumer_tp_size": self.config.tp_size,
                    },
                )
                released = True
            if num_external == 0:
                seed, garbage = kv_fingerprint(ch.text), False  # nothing external to load
            elif fp is not None:
                self.stats.kv_received += 1
                seed, garbage = fp, False
            else:
                seed, garbage = self._garbage(ch, why), True
            await self._emit(ch, self._plan(ch, spec, seed, garbage), queue)
        except asyncio.CancelledError:
            if meta is not None and not released and read_rank is not None:
                # request_finished with do_remote_prefill still set: release P's blocks.
                self._spawn(
                    self._send_oneway(
                        meta.remote_host,
                        meta.remote_notify_port + _port_offset(read_rank, 0, meta.tp_size),
                        {
                            "type": "release",
                            "transfer_id": meta.transfer_id,
                            "consumer_tp_size": self.config.tp_size,
                        },
                    )
                )
            raise

    def _check_remote_groups(self, remote_block_ids: Any) -> list[Any]:
        """0.32 zips the local KV-cache groups (one here) with remote_block_ids, strict=True.

        A flat list of ints or several groups make that zip / _align_read_blocks raise in
        the scheduler: EngineCore dies.
        """
        if not isinstance(remote_block_ids, list):
            raise _Fatal(
                f"READ-mode decode leg: remote_block_ids {remote_block_ids!r} is not a list "
                "of per-KV-cache-group lists"
            )
        if len(remote_block_ids) != 1:
            raise _Fatal(
                f"READ-mode decode leg: remote_block_ids has {len(remote_block_ids)} entries "
                "but the model has 1 KV-cache group (zip(strict=True) raises ValueError); "
                "it must be NESTED like [[12, 13]], not flat"
            )
        group = remote_block_ids[0]
        if not isinstance(group, list):
            raise _Fatal(
                f"READ-mode decode leg: remote_block_ids is flat ({remote_block_ids!r}): "
                "_align_read_blocks calls len() on an int (TypeError); it must be NESTED"
            )
        return group

    def _read_reply(
        self, reply: list[bytes] | None, meta: _ReqMeta, port: int
    ) -> tuple[str | None, str]:
        if reply is None:
            return None, (
                f"KV read from {meta.remote_host}:{port} timed out after "
                f"{self.config.transfer_timeout:.1f}s"
            )
        try:
            data = msgpack.unpackb(reply[-1], raw=False)
        except Exception:
            data = None
        if isinstance(data, dict) and data.get("ok") and isinstance(data.get("fingerprint"), str):
            return data["fingerprint"], ""
        err = data.get("error") if isinstance(data, dict) else repr(reply)
        return None, f"KV read from {meta.remote_host}:{port} failed: {err}"

    async def _write_decode_leg(self, ch: _Choice, spec: _Spec, queue: asyncio.Queue[Any]) -> None:
        """D, WRITE, do_remote_prefill: tell P where to write, wait (forever) for the KV."""
        assert ch.kv is not None
        kv = ch.kv
        st = self._ranks[ch.rank]
        tid = self._adopt_transfer_id(ch)
        # update_state_after_alloc, WRITE consumer branch (moriio_connector.py:1101-1205)
        remote_dp_rank = kv.get("remote_dp_rank", 0)
        try:
            dp_size = int(kv.get("remote_dp_size", 1) or 1)
        except (TypeError, ValueError) as e:
            raise _Fatal(
                f"WRITE-mode decode leg: remote_dp_size {kv.get('remote_dp_size')!r} is not an "
                f"integer ({e})"
            ) from e
        try:
            dp_local = int(kv.get("remote_dp_size_local", 0) or 0)
            if dp_local > 0:
                dp_size = min(dp_size, dp_local)
        except (TypeError, ValueError):
            dp_local = 0
        if dp_size > 1 and "remote_dp_rank" not in kv and "is_request_leader" not in kv:
            logger.warning(
                "%s MoRI-IO decode notify: remote_dp_size=%d but the router did not pin "
                "remote_dp_rank for request %s; defaulting to rank 0",
                self._tag,
                dp_size,
                ch.engine_id,
            )
        leader = kv.get("is_request_leader")
        if leader is not None:
            should_notify = bool(leader)
        elif kv.get("remote_dp_rank_override"):
            should_notify = ch.rank == remote_dp_rank  # 0.32: _global_dp_rank == remote_dp_rank
        else:
            should_notify = True  # _is_kv_master (single pod)
        target: tuple[str, int] | None = None
        if should_notify:
            peer = _peer_zmq_from_request_id(ch.engine_id, is_producer=False)
            if peer is not None:
                try:
                    host, _, notify_base = _parse_zmq_address(peer)
                except ValueError as e:
                    raise _Fatal(
                        f"WRITE-mode decode leg: the X-Request-Id embeds a malformed prefill "
                        f"zmq_address ({e})"
                    ) from e
            else:
                host = kv.get("remote_host") or ""
                try:
                    notify_base = int(kv.get("remote_notify_port") or 0)
                except (TypeError, ValueError):
                    notify_base = 0
                if not host or not notify_base:
                    raise _Fatal(
                        f"WRITE-mode decode leg: request {ch.engine_id!r} has no embedded "
                        "prefill zmq_address and kv_transfer_params is missing remote_host / "
                        f"remote_notify_port (got remote_host={host!r}, "
                        f"remote_notify_port={notify_base!r})"
                    )
            if type(remote_dp_rank) is not int:
                raise _Fatal(
                    f"WRITE-mode decode leg: remote_dp_rank {remote_dp_rank!r} is not an "
                    "integer (port arithmetic raises TypeError)"
                )
            port_rank = remote_dp_rank % dp_local if dp_local else remote_dp_rank
            target = (str(host), notify_base + _port_offset(port_rank, 0))
        else:
            logger.warning(
                "%s request %s: remote_dp_rank_override with remote_dp_rank=%r but this "
                "engine is DP rank %d: no notify is sent and the request waits forever "
                "(0.32 behaviour)",
                self._tag,
                ch.engine_id,
                remote_dp_rank,
                ch.rank,
            )
        blocks = self._alloc_blocks(len(ch.words))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if tid in st.unmatched_writes:
            fut.set_result(st.unmatched_writes.pop(tid))
        else:
            st.write_waiters[tid] = fut
        notified = False
        waiting = False
        try:
            await self._sleep(self.config.prefill_latency)
            if target is not None:
                await self._send_oneway(
                    target[0],
                    target[1],
                    {
                        "req_id": ch.engine_id,
                        "transfer_id": kv["transfer_id"],
                        "block_notify_list": blocks,
                        "decode_rank": ch.rank,
                        "type": "remote_blocks",
                    },
                )
            notified = True
            waiting = True
            fp = await fut  # no timeout: vLLM 0.32 has none on the WRITE consumer
            waiting = False
            if isinstance(fp, str):
                self.stats.kv_received += 1
                seed, garbage = fp, False
            else:
                seed, garbage = self._garbage(ch, "write_done carried no KV"), True
            await self._emit(ch, self._plan(ch, spec, seed, garbage), queue)
        except asyncio.CancelledError:
            if st.write_waiters.get(tid) is fut:
                del st.write_waiters[tid]
            if waiting:
                self.stats.kv_wait_cancelled += 1
                logger.warning(
                    "%s request %s cancelled while waiting for KV (transfer %s): vLLM 0.32 "
                    "leaks its %d blocks until restart",
                    self._tag,
                    ch.engine_id,
                    tid,
                    len(blocks),
                )
            elif not notified:
                self._spawn(self._release_write_prefill(kv, ch.engine_id))
            raise

    async def _release_write_prefill(self, kv: dict[str, Any], request_id: str) -> None:
        """0.32 _release_write_prefill_blocks: abort before scheduling frees P's blocks."""
        transfer_id = kv.get("transfer_id")
        if transfer_id is None:
            return
        host = kv.get("remote_host")
        port = kv.get("remote_notify_port")
        if host is None or port is None:
            peer = _peer_zmq_from_request_id(request_id, is_producer=False)
            if peer is None:
                return
            try:
                host, _, port = _parse_zmq_address(peer)
            except ValueError:
                return
        try:
            target = int(port) + _port_offset(int(kv.get("remote_dp_rank", 0)), 0)
        except (TypeError, ValueError):
            return
        await self._send_oneway(
            str(host),
            target,
            {
                "type": "release",
                "transfer_id": transfer_id,
                "consumer_tp_size": self.config.tp_size,
            },
        )


class _ListenerDied(Exception):
    """0.32's notify listener thread raises on this message and stops listening."""


def _choice_by_index(choices: list[_Choice], index: int) -> _Choice:
    """The choice with this OpenAI ``index``."""
    for ch in choices:
        if ch.index == index:
            return ch
    raise KeyError(index)


async def run_sim(config: SimConfig) -> int:
    """Run one simulated instance until SIGINT/SIGTERM (exit 0) or engine death (exit 1)."""
    inst = SimInstance(config)
    await inst.start()
    control = f" control={inst.control_url}" if inst.control_url else ""
    print(
        f"moriio-proxy sim: role={config.role} mode={config.mode} url={inst.url} "
        f"http_address={inst.http_address} zmq_address={inst.zmq_address}{control}",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop_event = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    waiters = [
        asyncio.ensure_future(stop_event.wait()),
        asyncio.ensure_future(inst.wait_dead()),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await inst.stop()
    if inst.dead_reason is not None:
        print(f"moriio-proxy sim: engine died: {inst.dead_reason}", flush=True)
        return 1
    return 0


__all__ = [
    "EOS_MARKER",
    "LegRecord",
    "SimConfig",
    "SimFaults",
    "SimInstance",
    "SimStats",
    "chat_prompt_text",
    "expected_text",
    "kv_fingerprint",
    "normalize_prompt",
    "run_sim",
]
