"""The ``check`` subcommand: its arguments, and the exit status for a shell or a CI job."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Callable
from typing import TypeVar

from .probes import normalize_url
from .runner import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_TIMEOUT,
    INSTANCE_TIMEOUT,
    run_check,
)

N = TypeVar("N", int, float)


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """An argparse ``type`` for a number above 0 (``check`` and ``admin`` share it)."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """The ``check`` subcommand, added to the CLI's subparsers."""
    parser = sub.add_parser(
        "check",
        help="check a running deployment through its proxy",
        description="Inspect a running P/D deployment through the proxy's HTTP API, probe "
        "each registered instance, send one small completion, and print one OK/WARN/FAIL "
        "line per check with the next step for anything not OK. Exit status: 0 nothing "
        "failed (warnings allowed), 1 a check failed, 2 bad usage.",
    )
    parser.add_argument("url", metavar="URL", help="the proxy, e.g. http://10.0.0.1:10001")
    parser.add_argument(
        "--model", default=None, help="model of the test completion (default: the first listed)"
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=DEFAULT_TIMEOUT,
        help=f"seconds allowed for each call (default {DEFAULT_TIMEOUT:g}; the direct "
        f"instance probes: at most {INSTANCE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive(int),
        default=DEFAULT_MAX_TOKENS,
        help=f"of the test completion (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"of the test completion (default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MORIIO_PROXY_API_KEY", "").split(",")[0] or None,
        help="a client key of a proxy started with --api-key (default: the first of "
        "MORIIO_PROXY_API_KEY, if set)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("MORIIO_PROXY_ADMIN_TOKEN") or None,
        help="the token of a proxy started with --admin-token (default: "
        "MORIIO_PROXY_ADMIN_TOKEN, if set)",
    )
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        help="CA certificate (PEM) an https:// proxy's certificate, and https instances', "
        "chain to (default: the system's CAs)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of lines"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``check`` for parsed arguments; prints the report and returns the exit status."""
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        print(f"moriio-proxy check: error: {exc}", file=sys.stderr)
        return 2
    if args.cacert:
        try:
            ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as exc:
            print(f"moriio-proxy check: error: --cacert {args.cacert}: {exc}", file=sys.stderr)
            return 2
    report = asyncio.run(
        run_check(
            url,
            model=args.model,
            timeout=args.timeout,
            max_tokens=args.max_tokens,
            prompt=args.prompt,
            api_key=args.api_key,
            admin_token=args.admin_token,
            cafile=args.cacert,
        )
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.to_text(), flush=True)
    return report.exit_code
