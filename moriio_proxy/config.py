"""ProxyConfig: one frozen value built from CLI flags > MORIIO_PROXY_* env > YAML > defaults.

Every option is declared once in ``OPTIONS`` so the command line, the environment, the
YAML file and the README cannot drift apart; every bad value becomes one line that names
the flag, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .policies import POLICIES
from .protocol import Instance, RegistrationError, parse_registration

ENV_PREFIX = "MORIIO_PROXY_"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The vLLM pods Kubernetes discovery watches, as deploy/kubernetes labels them. Defined
# here, where the options are, and used as defaults by discovery.kubernetes.source.
DEFAULT_PREFILL_SELECTOR = "moriio.io/role=prefill"
DEFAULT_DECODE_SELECTOR = "moriio.io/role=decode"
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # an RFC 9110 token


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


# --------------------------------------------------------------------------- parsers


def _number(text: Any) -> Any:
    """Refuse YAML booleans, which ``int()``/``float()`` would turn into 1 or 0."""
    if isinstance(text, bool):
        raise ValueError("must be a number, not a boolean")
    return text


def _int(text: Any) -> int:
    """An integer; a YAML float such as 80.5 is refused rather than truncated."""
    text = _number(text)
    if isinstance(text, float) and not text.is_integer():
        raise ValueError("must be a whole number")
    return int(text)


def _positive_float(text: Any) -> float:
    value = float(_number(text))
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _non_negative_float(text: Any) -> float:
    value = float(_number(text))
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _port(text: Any) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _non_negative_int(text: Any) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_int(text: Any) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    """One of ``allowed``, in any case, returned as spelled there (``read`` is READ)."""

    def parse(text: Any) -> str:
        value = str(text).strip()
        lowered = {a.lower(): a for a in allowed}
        if value.lower() not in lowered:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return lowered[value.lower()]

    return parse


def _ratio(text: Any) -> float:
    value = float(_number(text))
    if not value >= 1 or value == float("inf"):
        raise ValueError("must be a number, 1 or more")
    return value


def _header_name(text: Any) -> str:
    value = str(text).strip()
    if not _HEADER_NAME_RE.fullmatch(value):
        raise ValueError("must be an HTTP header name such as X-Session-ID")
    return value


def _networks(text: Any) -> tuple[Network, ...]:
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return tuple(ipaddress.ip_network(str(i).strip(), strict=False) for i in items if i)
    except ValueError as exc:
        raise ValueError(f"must be comma-separated networks like 10.0.0.0/8 ({exc})") from None


def _text(text: Any) -> str:
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        raise ValueError("must be a string")
    return str(text).strip()


def _secret(text: Any) -> str:
    """A key or token as a client sends it after ``Bearer ``: printable ASCII, no spaces."""
    value = _text(text)
    if not value or not all("!" <= c <= "~" for c in value):
        raise ValueError("must be printable ASCII without spaces")
    return value


def _secrets(text: Any) -> tuple[str, ...]:
    """Keys from a repeated flag (a list), the environment or the file (comma-separated)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(_secret(i) for i in items if str(i).strip())


def _optional_secret(text: Any) -> str:
    return _secret(text) if str(text).strip() else ""


def _switch(text: Any) -> bool:
    """A switch: given on the command line it is True; from the environment or the file
    it takes the usual words for yes and no."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _non_negative_rate(text: Any) -> float:
    value = float(_number(text))
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of requests per second, 0 or more")
    return value


def _host(text: Any) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


@dataclass(frozen=True)
class Option:
    """One setting: its flag, how to parse it, and what ``serve --help`` says of it.

    ``choices``: the values a choice setting takes (any case; see ``choice_option``).
    ``default_text``: the default in words, for a default whose value says nothing (an
    empty string or list that the proxy fills in at run time).
    """

    name: str
    parse: Callable[[Any], Any]
    help: str
    choices: tuple[str, ...] = ()
    default_text: str = ""
    # A switch takes no value on the command line; a repeated flag may be given many times;
    # a secret's value is never echoed in an error message.
    switch: bool = False
    repeated: bool = False
    secret: bool = False
    metavar: str = ""  # the value's name in --help (default: the last word of the name)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def help_line(self, default: Any) -> str:
        """The help text: what it does, the values it takes, its variable, its default."""
        shown = self.default_text or _show(default)
        if not shown:
            raise ValueError(f"{self.flag}: the default needs default_text to be shown")
        choices = f"; one of {', '.join(self.choices)} (any case)" if self.choices else ""
        return f"{self.help}{choices} [env {self.env}] (default: {shown})"


def choice_option(name: str, choices: tuple[str, ...], help: str) -> Option:
    """A setting that takes one of ``choices``, in any case (``read`` is READ)."""
    return Option(name, _choice(*choices), help, choices=choices)


def _show(value: Any) -> str:
    """A default as it would be typed: 300 for 300.0, lists comma-separated."""
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# README: Security. Limits are counted by each process: with --workers N, per-key limits
# allow up to N times the figure (the kernel spreads connections over the workers).
SECURITY_OPTIONS: tuple[Option, ...] = (
    Option(
        "api_key",
        _secrets,
        "client API key for the generation routes and /v1/models (Authorization: Bearer "
        "KEY); repeat the flag for several keys (comma-separated in the environment)",
        default_text="none: no key needed",
        metavar="KEY",
        repeated=True,
        secret=True,
    ),
    Option(
        "api_key_file",
        _text,
        "file of client API keys, one a line ('#' starts a comment), added to --api-key and "
        "read again on SIGHUP",
        default_text="none",
        metavar="PATH",
    ),
    Option(
        "ready_requires_key",
        _switch,
        "/ready needs a client API key too (/health never does)",
        switch=True,
        default_text="off",
    ),
    Option(
        "metrics_requires_key",
        _switch,
        "/metrics needs a client API key too",
        switch=True,
        default_text="off",
    ),
    Option(
        "upstream_api_key",
        _optional_secret,
        "key sent to every vLLM instance (Authorization: Bearer KEY), as their --api-key",
        default_text="none",
        secret=True,
    ),
    choice_option(
        "upstream_auth",
        ("auto", "passthrough", "none"),
        "what vLLM instances are sent: auto is --upstream-api-key when set, else nothing; "
        "passthrough forwards the client's own Authorization header",
    ),
    Option(
        "admin_token",
        _optional_secret,
        "token every /admin/* path and /start_profile, /stop_profile need (Authorization: "
        "Bearer TOKEN); without it only read-only GET /admin/* is served",
        default_text="none",
        secret=True,
    ),
    Option(
        "admin_allow_localhost",
        _switch,
        "without --admin-token, serve state-changing admin calls to loopback clients",
        switch=True,
        default_text="off",
    ),
    Option("certfile", _text, "TLS certificate (PEM) to serve HTTPS with", default_text="none"),
    Option("keyfile", _text, "private key (PEM) of --certfile", default_text="none"),
    Option(
        "ca_certs",
        _text,
        "CA bundle (PEM): clients must present a certificate it signed (mTLS)",
        default_text="none: no client certificate asked",
    ),
    choice_option(
        "upstream_scheme",
        ("http", "https"),
        "scheme of every vLLM instance (heartbeats carry none); https also applies to "
        "static instances",
    ),
    Option(
        "upstream_ca_bundle",
        _text,
        "CA bundle (PEM) that HTTPS vLLM instances' certificates must chain to",
        default_text="the system's CAs",
    ),
    Option(
        "upstream_client_cert",
        _text,
        "client certificate (PEM) presented to HTTPS vLLM instances",
        default_text="none",
    ),
    Option(
        "upstream_client_key",
        _text,
        "private key (PEM) of --upstream-client-cert",
        default_text="none",
    ),
    Option(
        "max_header_bytes",
        _positive_int,
        "largest request head (request line and headers) accepted; larger gets 431",
    ),
    Option(
        "max_tokens_limit",
        _non_negative_int,
        "largest max_tokens/max_completion_tokens a client may ask for (400 above it; a "
        "request without one is given this); 0 is no limit",
    ),
    Option(
        "max_inflight_per_key",
        _non_negative_int,
        "generation requests one API key (or, without keys, one client address) may have "
        "in flight, per worker; 429 above it; 0 is no limit",
        metavar="N",
    ),
    Option(
        "rate_limit_per_key",
        _non_negative_rate,
        "generation requests per second one API key (or client address) may start, per "
        "worker, with a burst of as many; 429 with Retry-After above it; 0 is no limit",
        metavar="RPS",
    ),
)


OPTIONS: tuple[Option, ...] = (
    Option("host", _host, "HTTP bind address"),
    Option("port", _port, "HTTP port for OpenAI clients"),
    Option("discovery_host", _host, "ZMQ ROUTER bind address for vLLM heartbeats"),
    Option("discovery_port", _port, "ZMQ ROUTER port (vLLM's proxy_ping_port)"),
    Option(
        "discovery_allow",
        _networks,
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
        _text,
        "namespace of the vLLM pods",
        default_text="the proxy pod's own namespace",
    ),
    Option("k8s_prefill_selector", _text, "label selector of prefill pods"),
    Option("k8s_decode_selector", _text, "label selector of decode pods"),
    Option(
        "k8s_api_url",
        _text,
        "Kubernetes API URL",
        default_text="in-cluster config, else ~/.kube/config",
    ),
    Option("instance_ttl", _positive_float, "seconds without a heartbeat before eviction"),
    choice_option(
        "transfer_mode",
        ("auto", "READ", "WRITE"),
        "pin the KV transfer mode (auto: the first instance's mode)",
    ),
    choice_option("prefill_policy", POLICIES, "how the prefill instance and DP rank are chosen"),
    choice_option("decode_policy", POLICIES, "how the decode instance is chosen"),
    Option(
        "balance_abs_threshold",
        _non_negative_int,
        "cache_aware/session: the preferred target gives way to the least loaded when its "
        "in-flight legs exceed the least loaded's by more than this many (and by the ratio)",
    ),
    Option(
        "balance_rel_threshold",
        _ratio,
        "cache_aware/session: ...and are more than this many times the least loaded's",
    ),
    Option(
        "cache_block_chars",
        _positive_int,
        "cache_aware: characters per indexed prompt block (4 bytes per token for token "
        "prompts); shorter prompts are not indexed",
    ),
    Option(
        "cache_max_blocks",
        _positive_int,
        "cache_aware: prompt blocks remembered, least recently used evicted first "
        "(about 140 bytes each)",
    ),
    Option(
        "session_header",
        _header_name,
        "session: request header naming the session (else the body's 'user' field)",
    ),
    Option("connect_timeout", _positive_float, "seconds to open an upstream connection"),
    Option("prefill_timeout", _positive_float, "seconds for the whole prefill leg"),
    Option(
        "decode_first_byte_timeout",
        _positive_float,
        "seconds until the decode leg's response starts",
    ),
    Option("stream_idle_timeout", _positive_float, "seconds allowed between decode stream chunks"),
    Option(
        "request_timeout",
        _positive_float,
        "end-to-end deadline of one request, from arrival to the stream's last byte",
    ),
    Option(
        "max_retries",
        _non_negative_int,
        "retries on a fresh pair after an upstream failure, while no byte reached the client",
    ),
    Option("retry_backoff", _non_negative_float, "first retry delay in seconds; doubles each time"),
    Option(
        "eject_after",
        _non_negative_int,
        "consecutive failures (refused, 5xx, timeout) that take an instance out of rotation; "
        "0 disables",
    ),
    Option("eject_seconds", _positive_float, "how long an ejected instance rests before a retry"),
    Option(
        "max_inflight",
        _non_negative_int,
        "requests served at once before new ones get 429; 0 is unlimited",
    ),
    Option(
        "drain_timeout",
        _non_negative_float,
        "seconds in-flight requests may take to finish after SIGTERM",
    ),
    Option("max_body_bytes", _positive_int, "largest accepted request body"),
    choice_option("log_level", ("debug", "info", "warning", "error", "critical"), "logging level"),
    Option(
        "workers",
        _positive_int,
        "serving processes sharing the HTTP port (SO_REUSEPORT); discovery runs once and "
        "feeds them all; about one per core the proxy may use",
    ),
    choice_option(
        "event_loop",
        ("auto", "uvloop", "asyncio"),
        "event loop: uvloop when installed (auto), or force one",
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
