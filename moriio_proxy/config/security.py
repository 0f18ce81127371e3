"""The security settings (README: Security), declared as every other setting is."""

from __future__ import annotations

from . import parsers
from .options import Option, choice_option

# README: Security. Limits are counted by each process: with --workers N, per-key limits
# allow up to N times the figure (the kernel spreads connections over the workers).
SECURITY_OPTIONS: tuple[Option, ...] = (
    Option(
        "api_key",
        parsers.secret_list,
        "client API keys for the generation routes and /v1/models (Authorization: Bearer "
        "KEY), as vllm serve takes them: --api-key A B, or the flag repeated "
        "(comma-separated in the environment)",
        default_text="none: no key needed",
        metavar="KEY",
        repeated=True,
        secret=True,
    ),
    Option(
        "api_key_file",
        parsers.string,
        "file of client API keys, one a line ('#' starts a comment), added to --api-key and "
        "read again on SIGHUP",
        default_text="none",
        metavar="PATH",
    ),
    Option(
        "ready_requires_key",
        parsers.switch,
        "/ready needs a client API key too (/health never does)",
        switch=True,
        default_text="off",
    ),
    Option(
        "metrics_requires_key",
        parsers.switch,
        "/metrics needs a client API key too",
        switch=True,
        default_text="off",
    ),
    Option(
        "upstream_api_key",
        parsers.optional_secret,
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
        parsers.optional_secret,
        "token every /admin/* path and /start_profile, /stop_profile need (Authorization: "
        "Bearer TOKEN); without it only read-only GET /admin/* is served",
        default_text="none",
        secret=True,
    ),
    Option(
        "admin_allow_localhost",
        parsers.switch,
        "without --admin-token, serve state-changing admin calls to loopback clients",
        switch=True,
        default_text="off",
    ),
    Option(
        "certfile", parsers.string, "TLS certificate (PEM) to serve HTTPS with", default_text="none"
    ),
    Option("keyfile", parsers.string, "private key (PEM) of --certfile", default_text="none"),
    Option(
        "ca_certs",
        parsers.string,
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
        parsers.string,
        "CA bundle (PEM) that HTTPS vLLM instances' certificates must chain to",
        default_text="the system's CAs",
    ),
    Option(
        "upstream_client_cert",
        parsers.string,
        "client certificate (PEM) presented to HTTPS vLLM instances",
        default_text="none",
    ),
    Option(
        "upstream_client_key",
        parsers.string,
        "private key (PEM) of --upstream-client-cert",
        default_text="none",
    ),
    Option(
        "max_header_bytes",
        parsers.positive_int,
        "largest request head accepted (path, query and header names and values); larger gets 431",
    ),
    Option(
        "max_tokens_limit",
        parsers.non_negative_int,
        "largest max_tokens/max_completion_tokens a client may ask for (400 above it; a "
        "request without one is given this); 0 is no limit",
    ),
    Option(
        "max_inflight_per_key",
        parsers.non_negative_int,
        "generation requests one API key (or, without keys, one client address) may have "
        "in flight, per worker; 429 above it; 0 is no limit",
        metavar="N",
    ),
    Option(
        "rate_limit_per_key",
        parsers.non_negative_rate,
        "generation requests per second one API key (or client address) may start, per "
        "worker, with a burst of as many; 429 with Retry-After above it; 0 is no limit",
        metavar="RPS",
    ),
)
