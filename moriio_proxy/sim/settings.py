"""What a simulated instance is told (SimConfig, SimFaults) and what it reports (SimStats,
LegRecord): the simulator's whole public data surface, free of sockets and asyncio.

Tests, the CLI and the benchmarks build these objects by hand, so their fields, defaults and
validation messages are a contract: a field rename breaks ``moriio-proxy sim`` flags and
``POST /sim/faults`` bodies.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

_INF_WORDS = ("inf", "+inf", "infinity", "+infinity")

#: The vLLM releases the simulator can behave as (``SimConfig.vllm_version``), oldest first.
VLLM_VERSIONS = ("0.32", "0.33")
#: Model architectures, for what the connector refuses at start-up (``SimConfig.model_arch``).
MODEL_ARCHS = ("dense", "hybrid", "sliding_window")


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
    """JSON has no infinity: ``math.inf`` travels as ``"inf"``, which ``_seconds`` reads back."""
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
            pair: Any = self.stall_after_tokens
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
        p: Any = self.probability
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
    def from_dict(cls, data: Any, base: SimFaults | None = None) -> SimFaults:
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
    # The prefix cache of each DP rank (vLLM 0.32 enables it by default): prompt blocks
    # already computed are not computed again. Capacity in blocks of block_size tokens
    # (vLLM sizes it from GPU memory; --num-gpu-blocks-override sets it).
    enable_prefix_caching: bool = True
    num_gpu_blocks: int = 65_536
    # Seconds per prompt token a rank computes (prefix-cache hits cost nothing). A rank
    # computes one prompt after another, so this is also what makes a busy rank's queue
    # grow; prefill_latency is a fixed cost on top, paid concurrently.
    prefill_token_latency: float = 0.0
    # usage.prompt_tokens_details (cached_tokens) in answers, as vLLM's
    # --enable-prompt-tokens-details (off by default there too).
    enable_prompt_tokens_details: bool = False
    max_leg_records: int = 100_000  # bound on SimInstance.legs for long benchmark runs
    # Fault injection. /sim/faults and /sim/stats are always served on the HTTP port; with
    # control_port set (0 = pick a free port) ALSO on this port, which refuse_connections
    # leaves open.
    control_port: int | None = None
    seed: int | None = None  # seeds SimFaults.probability draws, so runs repeat
    # Serve the OpenAI port over TLS with this certificate and key (PEM), as a vLLM started
    # with --ssl-certfile/--ssl-keyfile; the control port stays plain HTTP.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    faults: SimFaults = field(default_factory=SimFaults)  # initial faults (copied at init)
    # The vLLM release to behave as ("0.32" or "0.33"): GET /version, and each connector or
    # server behaviour that differs between them (the package docstring lists where).
    vllm_version: str = VLLM_VERSIONS[-1]
    # "dense", "hybrid" (Mamba/KDA layers) or "sliding_window": only decides whether the
    # connector refuses to start (WRITE mode: 0.32 refuses both others, 0.33 sliding only).
    model_arch: str = "dense"
    # vLLM serves POST /start_profile and /stop_profile only when started with a profiler
    # configuration (--profiler-config); without one, both answer 404 as vLLM's do.
    profiler: bool = False

    def validate(self) -> None:
        """Raise ValueError on a setting ``vllm serve`` would refuse (checked by SimInstance)."""
        if self.role not in ("P", "D"):
            raise ValueError(f"role must be 'P' or 'D', got {self.role!r}")
        if self.mode not in ("READ", "WRITE"):
            raise ValueError(f"mode must be 'READ' or 'WRITE', got {self.mode!r}")
        if self.vllm_version not in VLLM_VERSIONS:
            raise ValueError(
                f"vllm_version must be one of {', '.join(VLLM_VERSIONS)}, got {self.vllm_version!r}"
            )
        if self.model_arch not in MODEL_ARCHS:
            raise ValueError(
                f"model_arch must be one of {', '.join(MODEL_ARCHS)}, got {self.model_arch!r}"
            )
        refusal = write_mode_refusal(self.mode, self.model_arch, self.vllm_version)
        if refusal is not None:
            raise ValueError(refusal)
        if self.dp_size < 1 or self.tp_size < 1:
            raise ValueError("dp_size and tp_size must be >= 1")
        if self.block_size < 1 or self.num_gpu_blocks < 1:
            raise ValueError("block_size and num_gpu_blocks must be >= 1")
        if not self.prefill_token_latency >= 0:
            raise ValueError(
                f"prefill_token_latency must be >= 0, got {self.prefill_token_latency!r}"
            )
        if self.control_port is not None and not 0 <= self.control_port <= 65535:
            raise ValueError(f"control_port must be 0-65535, got {self.control_port!r}")


def write_mode_refusal(mode: str, model_arch: str, vllm_version: str) -> str | None:
    """What the MoRI-IO connector raises at start-up for a model it cannot serve in WRITE
    mode (the engine never comes up, so the instance never heartbeats), or None.

    0.32 refuses hybrid (Mamba/KDA) models and sliding-window cache groups; 0.33 accepts
    hybrid models and still refuses sliding window (docs/protocol.md section 10).
    """
    if mode != "WRITE" or model_arch == "dense":
        return None
    if model_arch == "sliding_window":
        if vllm_version == "0.32":
            return (
                "NotImplementedError: MoRIIO WRITE mode does not support hybrid KV cache "
                "groups (sliding-window attention). Use READ mode, or pass "
                "--disable-hybrid-kv-cache-manager."
            )
        return (
            "NotImplementedError: MoRIIO WRITE mode does not support sliding-window cache "
            "groups. Use READ mode, or pass --disable-hybrid-kv-cache-manager."
        )
    if vllm_version == "0.32":
        return (
            "MoRIIOError: MoRIIO hybrid (mamba/KDA) transfer is implemented for READ mode "
            "only; set kv_connector_extra_config.read_mode=true"
        )
    return None


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
    kv_load_failures: int = 0  # D, WRITE, 0.33: requests failed on a write_failed message
    blocks_reaped: int = 0  # P: held blocks freed by defer_timeout (nobody took the KV)
    write_failed_sent: int = 0  # P, WRITE, 0.33: write_failed messages sent to decode ranks
    notify_listeners_died: int = 0  # D, 0.32: ranks whose notify listener a write_failed killed
    # The prefix cache, in tokens, as vLLM's vllm:prefix_cache_queries / _hits count them:
    # prompt tokens looked up and found, over engine requests that compute their prompt
    # (decode legs take theirs from P and are not counted). hits / queries is the hit rate.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_evicted_blocks: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens charged prefill_token_latency
    # Injected faults by kind: "status", "die_after_tokens", "stall_first_byte",
    # "stall_after_tokens" (per request, when they actually happen) and
    # "refuse_connections" (each time the listener is closed).
    faults_applied: dict[str, int] = field(default_factory=dict)
    # The profiler (SimConfig.profiler): calls answered 200, and whether it runs now.
    profiles_started: int = 0
    profiles_stopped: int = 0
    profiling: bool = False


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
    # Prompt tokens of this request's engine requests served from the prefix cache (a
    # decode leg: what P reported, else what arrived as KV) and computed here.
    cached_tokens: int = 0
    computed_tokens: int = 0
