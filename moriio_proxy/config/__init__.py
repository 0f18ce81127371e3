"""ProxyConfig: one frozen value built from CLI flags > MORIIO_PROXY_* env > YAML > defaults.

Every option is declared once in ``OPTIONS`` so the command line, the environment, the
YAML file and the README cannot drift apart; every bad value becomes one line that names
the flag, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ..policies import POLICIES
from ..protocol import Instance, RegistrationError, parse_registration
from . import parsers
from .options import ENV_PREFIX, Option, choice_option
from .parsers import Network
from .security import SECURITY_OPTIONS

__all__ = [
    "DEFAULT_DECODE_SELECTOR",
    "DEFAULT_PREFILL_SELECTOR",
    "ENV_PREFIX",
    "OPTIONS",
    "ConfigError",
    "Network",
    "Option",
    "ProxyConfig",
    "choice_option",
    "load_config",
]

# The vLLM pods Kubernetes discovery watches, as deploy/kubernetes labels them. Defined
# here, where the options are, and used as defaults by discovery.kubernetes.source.
DEFAULT_PREFILL_SELECTOR = "moriio.io/role=prefill"
DEFAULT_DECODE_SELECTOR = "moriio.io/role=decode"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "0.0.0.0"
    port: int = 10001
    discovery_host: str = "0.0.0.0"
    discovery_port: int = 36367
    discovery_allow: tuple[Network, ...] = ()
    discovery: Literal["zmq", "kubernetes"] = "zmq"
    k8s_namespace: str = ""
    k8s_prefill_selector: str = DEFAULT_PREFILL_SELECTOR
    k8s_decode_selector: str = DEFAULT_DECODE_SELECTOR
    k8s_api_url: str = ""
    instance_ttl: float = 10.0
    transfer_mode: Literal["auto", "READ", "WRITE"] = "auto"
    prefill_policy: str = "cache_aware"
    decode_policy: str = "least_loaded"
    balance_abs_threshold: int = 2
    balance_rel_threshold: float = 1.5
    cache_block_chars: int = 128
    cache_max_blocks: int = 1 << 18
    session_header: str = "X-Session-ID"
    connect_timeout: float = 5.0
    prefill_timeout: float = 300.0
    decode_first_byte_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    request_timeout: float = 1800.0
    max_retries: int = 2
    retry_backoff: float = 0.05
    eject_after: int = 3
    eject_seconds: float = 30.0
    max_inflight: int = 4096
    drain_timeout: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    workers: int = 1
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    access_log_format: Literal["text", "json", "off"] = "text"
    otlp_traces_endpoint: str = ""
    # Security (README: Security). Secrets stay out of repr: a config printed in a log or a
    # traceback must not carry them.
    api_key: tuple[str, ...] = field(default=(), repr=False)
    api_key_file: str = ""
    ready_requires_key: bool = False
    metrics_requires_key: bool = False
    upstream_api_key: str = field(default="", repr=False)
    upstream_auth: Literal["auto", "passthrough", "none"] = "auto"
    admin_token: str = field(default="", repr=False)
    admin_allow_localhost: bool = False
    certfile: str = ""
    keyfile: str = ""
    ca_certs: str = ""
    upstream_scheme: Literal["http", "https"] = "http"
    upstream_ca_bundle: str = ""
    upstream_client_cert: str = ""
    upstream_client_key: str = ""
    max_header_bytes: int = 64 * 1024
    max_tokens_limit: int = 0
    max_inflight_per_key: int = 0
    rate_limit_per_key: float = 0.0
    static_instances: tuple[Instance, ...] = field(default=())
    # The settings a flag, a variable or the file set (the rest are defaults), so startup
    # can say where a default it fell back on puts the discovery port. Not part of the value.
    given: frozenset[str] = field(default=frozenset(), compare=False)


OPTIONS: tuple[Option, ...] = (
    Option("host", parsers.host, "HTTP bind address"),
    Option("port", parsers.port, "HTTP port for OpenAI clients"),
    Option("discovery_host", parsers.host, "ZMQ ROUTER bind address for vLLM heartbeats"),
    Option("discovery_port", parsers.port, "ZMQ ROUTER port (vLLM's proxy_ping_port)"),
    Option(
        "discovery_allow",
        parsers.networks,
        "comma-separated source networks allowed to register, e.g. 10.0.0.0/8",
        default_text="any",
    ),
    choice_option(
        "discovery",
        ("zmq", "kubernetes"),
        "how instances are found: vLLM's ZMQ heartbeats, or watching pods (every replica "
        "sees every instance; needs the 'k8s' extra)",
    ),
    Option(
        "k8s_namespace",
        parsers.string,
        "namespace of the vLLM pods",
        default_text="the proxy pod's own namespace",
    ),
    Option("k8s_prefill_selector", parsers.string, "label selector of prefill pods"),
    Option("k8s_decode_selector", parsers.string, "label selector of decode pods"),
    Option(
        "k8s_api_url",
        parsers.string,
        "Kubernetes API URL",
        default_text="in-cluster config, else ~/.kube/config",
    ),
    Option("instance_ttl", parsers.positive_float, "seconds without a heartbeat before eviction"),
    choice_option(
        "transfer_mode",
        ("auto", "READ", "WRITE"),
        "pin the KV transfer mode (auto: the first instance's mode)",
    ),
    choice_option("prefill_policy", POLICIES, "how the prefill instance and DP rank are chosen"),
    choice_option("decode_policy", POLICIES, "how the decode instance is chosen"),
    Option(
        "balance_abs_threshold",
        parsers.non_negative_int,
        "cache_aware/session: the preferred target gives way to the least loaded when its "
        "in-flight legs exceed the least loaded's by more than this many (and by the ratio)",
    ),
    Option(
        "balance_rel_threshold",
        parsers.ratio,
        "cache_aware/session: ...and are more than this many times the least loaded's",
    ),
    Option(
        "cache_block_chars",
        parsers.positive_int,
        "cache_aware: characters per indexed prompt block (4 bytes per token for token "
        "prompts); shorter prompts are not indexed",
    ),
    Option(
        "cache_max_blocks",
        parsers.positive_int,
        "cache_aware: prompt blocks remembered, least recently used evicted first "
        "(about 140 bytes each)",
    ),
    Option(
        "session_header",
        parsers.header_name,
        "session: request header naming the session (else the body's 'user' field)",
    ),
    Option("connect_timeout", parsers.positive_float, "seconds to open an upstream connection"),
    Option("prefill_timeout", parsers.positive_float, "seconds for the whole prefill leg"),
    Option(
        "decode_first_byte_timeout",
        parsers.positive_float,
        "seconds until the decode leg's response starts",
    ),
    Option(
        "stream_idle_timeout",
        parsers.positive_float,
        "seconds allowed between decode stream chunks",
    ),
    Option(
        "request_timeout",
        parsers.positive_float,
        "end-to-end deadline of one request, from arrival to the stream's last byte",
    ),
    Option(
        "max_retries",
        parsers.non_negative_int,
        "retries on a fresh pair after an upstream failure, while no byte reached the client",
    ),
    Option(
        "retry_backoff",
        parsers.non_negative_float,
        "first retry delay in seconds; doubles each time",
    ),
    Option(
        "eject_after",
        parsers.non_negative_int,
        "consecutive failures (refused, 5xx, timeout) that take an instance out of rotation; "
        "0 disables",
    ),
    Option(
        "eject_seconds", parsers.positive_float, "how long an ejected instance rests before a retry"
    ),
    Option(
        "max_inflight",
        parsers.non_negative_int,
        "requests served at once, per worker process with --workers N; more get 429; 0: unlimited",
    ),
    Option(
        "drain_timeout",
        parsers.non_negative_float,
        "seconds in-flight requests may take to finish after SIGTERM",
    ),
    Option("max_body_bytes", parsers.positive_int, "largest accepted request body"),
    choice_option("log_level", ("debug", "info", "warning", "error", "critical"), "logging level"),
    Option(
        "workers",
        parsers.positive_int,
        "serving processes sharing the HTTP port (SO_REUSEPORT); discovery runs once and "
        "feeds them all; about one per core the proxy may use",
    ),
    choice_option(
        "event_loop",
        ("auto", "uvloop", "asyncio"),
        "event loop: uvloop when installed (auto), or force one",
    ),
    choice_option(
        "access_log_format",
        ("text", "json", "off"),
        "one line per request on the moriio_proxy.access logger (info): key=value text, "
        "JSON, or none",
    ),
    Option(
        "otlp_traces_endpoint",
        parsers.string,
        "OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces) to send a span per "
        "request, attempt and leg to; needs pip install 'moriio-proxy[otel]'",
        default_text="off",
    ),
    *SECURITY_OPTIONS,
)
_BY_NAME = {o.name: o for o in OPTIONS}


def load_config(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> ProxyConfig:
    """Merge the sources in precedence order; raise ConfigError naming the bad flag."""
    values: dict[str, Any] = {}
    file_values = _read_yaml(config_file) if config_file else {}
    statics = file_values.pop("instances", None)
    for key, raw in file_values.items():
        name = str(key).replace("-", "_")  # a YAML key may be a number
        if name not in _BY_NAME:
            raise ConfigError(f"{config_file}: unknown setting {key!r}")
        values[name] = _parse(_BY_NAME[name], raw, f"{config_file}: {key}")
    for option in OPTIONS:
        raw = (env if env is not None else os.environ).get(option.env)
        if raw is not None and raw != "":
            values[option.name] = _parse(option, raw, option.env)
    for name, raw in (cli or {}).items():
        if raw is not None:
            values[name] = _parse(_BY_NAME[name], raw, _BY_NAME[name].flag)
    if statics is not None:
        values["static_instances"] = _static_instances(statics, config_file)
    known = {f.name for f in fields(ProxyConfig)}
    settings = {k: v for k, v in values.items() if k in known}
    return _checked(ProxyConfig(**settings, given=frozenset(settings)))


def _checked(config: ProxyConfig) -> ProxyConfig:
    """Settings that only make sense together."""
    if bool(config.certfile) != bool(config.keyfile):
        raise ConfigError("--certfile and --keyfile go together: give both or neither")
    if config.ca_certs and not config.certfile:
        raise ConfigError("--ca-certs (client certificates) needs --certfile and --keyfile")
    if bool(config.upstream_client_cert) != bool(config.upstream_client_key):
        raise ConfigError(
            "--upstream-client-cert and --upstream-client-key go together: give both or neither"
        )
    if config.upstream_auth == "passthrough" and config.upstream_api_key:
        raise ConfigError(
            "--upstream-auth passthrough forwards the client's key: drop --upstream-api-key"
        )
    return config


def _parse(option: Option, raw: Any, where: str) -> Any:
    try:
        return option.parse(raw)
    except (TypeError, ValueError) as exc:
        detail = str(exc)
        if "invalid literal" in detail or "could not convert" in detail:
            detail = "is not a number"
        shown = "the value given" if option.secret else repr(raw)
        raise ConfigError(f"{where}: {detail} (got {shown})") from None


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings")
    return data


def _static_instances(items: Any, where: Any) -> tuple[Instance, ...]:
    """Instances listed in the YAML file, in the heartbeat's own shape; they never expire."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}: instances must be a list of registration maps")
    parsed = []
    for number, item in enumerate(items, 1):
        try:
            parsed.append(parse_registration(item))
        except RegistrationError as exc:
            raise ConfigError(f"{where}: instances[{number}]: {exc}") from None
    return tuple(parsed)
