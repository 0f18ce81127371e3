"""The proxy image's HEALTHCHECK: GET /health on the proxy's own HTTP port.

Exit status 0 when the proxy answers 200, 1 otherwise (Docker's healthy / unhealthy).
The address comes from the same variables the proxy reads, MORIIO_PROXY_HOST and
MORIIO_PROXY_PORT (default 10001); a wildcard bind address is checked on loopback. Only
the standard library is used, and any HTTP proxy in the environment is bypassed.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

DEFAULT_PORT = "10001"
TIMEOUT_SECONDS = 4.0


def health_url(env: Mapping[str, str]) -> str:
    host = env.get("MORIIO_PROXY_HOST", "").strip() or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    port = env.get("MORIIO_PROXY_PORT", "").strip() or DEFAULT_PORT
    return f"http://{host}:{port}/health"


def main() -> int:
    url = health_url(os.environ)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        print(f"unhealthy: GET {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: GET {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
