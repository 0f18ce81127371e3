"""What the HTTP-side controls cost per request: a micro-benchmark of each check as the
generation route runs it, on one core, against no network.

    .venv/bin/python bench/bench_security.py            # about 10 s
    .venv/bin/python bench/bench_security.py --number 200000

A proxied request costs the proxy about 2 ms of CPU in all (bench/results/overhead.md:
about 500 requests/s on one core); these figures say what a control adds to that.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moriio_proxy.completions import _headers  # noqa: E402
from moriio_proxy.security import AccessGuard, KeyLimits, KeyRing  # noqa: E402

# What an OpenAI SDK sends with a completion, as Hypercorn hands it over.
HEADERS = [
    (b"host", b"proxy.example:10001"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 1.54.0"),
    (b"x-stainless-lang", b"python"),
    (b"content-length", b"142"),
]
KEY = "sk-" + "a1" * 24


def scan_as_before(scope: dict[str, object], session_header: bytes) -> tuple[object, ...]:
    """The reference: completions._headers as it was before the security controls (no
    Authorization, no head size), so the difference is what they add."""
    request_id = length = session = None
    for name, value in scope["headers"]:  # type: ignore[attr-defined]
        if name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == session_header:
            session = value.decode("latin-1")
    return request_id, length, session


def per_call_ns(function: Callable[[], object], number: int) -> float:
    """The best of five runs, in nanoseconds per call (the least disturbed by neighbours)."""
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100_000, help="calls per timing run")
    args = parser.parse_args()
    n = args.number
    with_key = [*HEADERS, (b"authorization", f"Bearer {KEY}".encode())]
    scope_plain: dict[str, object] = {
        "type": "http",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "headers": HEADERS,
    }
    keyed = {**scope_plain, "headers": with_key}  # the same 9 headers for both scans
    one = KeyRing([KEY])
    many = KeyRing([KEY[:-2] + f"{i:02d}" for i in range(15)] + [KEY])
    limits = KeyLimits(max_inflight=100, rate=1e9)
    client = one.match(with_key[-1][1])

    async def nothing(*_: object) -> None:
        return None

    guard = AccessGuard(nothing, KeyRing(), max_head=65536)
    health = {**scope_plain, "path": "/health", "method": "GET"}

    def admit_release() -> None:
        limits.admit(client)
        limits.release(client)

    rows = [
        ("reference: header scan as before", lambda: scan_as_before(keyed, b"x-s")),
        ("header scan + Authorization + head size", lambda: _headers(keyed, b"x-s")),
        ("key check, 1 key configured", lambda: one.match(with_key[-1][1])),
        ("key check, 16 keys configured", lambda: many.match(with_key[-1][1])),
        ("key check, wrong key, 1 key", lambda: one.match(b"Bearer sk-wrong")),
        ("guard on a Quart path (/health: head size only)", lambda: guard.refusal(health)),
        ("per-key in-flight + rate admit/release", admit_release),
    ]
    print(f"{'check':45} ns/request")
    for name, function in rows:
        print(f"{name:45} {per_call_ns(function, n):8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
