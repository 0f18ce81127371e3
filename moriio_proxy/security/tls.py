"""TLS at both edges: the certificate the proxy serves HTTPS with (and the CA its clients'
certificates must chain to, for mTLS), and the SSL context of the one upstream connector
for HTTPS vLLM instances.

Both are checked at startup, so a missing or mismatched file is one line naming the flag
rather than a failure on the first connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..config import ConfigError, ProxyConfig


@dataclass(frozen=True)
class ServerTls:
    """What Hypercorn is given; ``ca_certs`` set means client certificates are required."""

    certfile: str
    keyfile: str
    ca_certs: str = ""


def server_tls(config: ProxyConfig) -> ServerTls | None:
    """The server's TLS settings, or None for plain HTTP; raises ConfigError on bad files."""
    if not config.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, config.certfile, config.keyfile, "--certfile/--keyfile")
    if config.ca_certs:
        _load_verify(context, config.ca_certs, "--ca-certs")
    return ServerTls(config.certfile, config.keyfile, config.ca_certs)


def upstream_ssl_context(config: ProxyConfig) -> ssl.SSLContext | None:
    """The context HTTPS upstream connections verify with, or None for aiohttp's default
    (the system's CAs, hostname checked). Only ``https://`` instances use it."""
    if not (config.upstream_ca_bundle or config.upstream_client_cert):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if config.upstream_ca_bundle:
        _load_verify(context, config.upstream_ca_bundle, "--upstream-ca-bundle")
    if config.upstream_client_cert:
        _load_chain(
            context,
            config.upstream_client_cert,
            config.upstream_client_key,
            "--upstream-client-cert/--upstream-client-key",
        )
    return context


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str, flags: str) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:  # before OSError, which it is a kind of
        raise ConfigError(f"{flags}: not a PEM certificate and its key: {exc.reason}") from None
    except OSError as exc:
        where = exc.filename or certfile
        raise ConfigError(f"{flags}: cannot read {where}: {exc.strerror}") from None


def _load_verify(context: ssl.SSLContext, cafile: str, flag: str) -> None:
    try:
        context.load_verify_locations(cafile)
    except ssl.SSLError as exc:  # before OSError, which it is a kind of
        raise ConfigError(f"{flag}: {cafile} holds no PEM CA certificate: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {cafile}: {exc.strerror}") from None
