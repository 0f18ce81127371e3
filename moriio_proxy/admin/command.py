"""``moriio-proxy admin URL ACTION``: the admin API from a shell, against a running proxy.

One HTTP call per command; what the proxy answers is printed as one line (or its JSON with
``--json``). Exit status: 0 done, 1 refused or failed (the proxy's reason on stderr, in one
line), 2 bad usage. With ``--token`` (or MORIIO_PROXY_ADMIN_TOKEN) every call carries
``Authorization: Bearer TOKEN``, which a proxy started with an admin token requires.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

from ..check.command import positive
from ..check.probes import normalize_url
from ..protocol import ROLES, TRANSFER_MODES
from ..views import AdminInstances, InstanceView, ViewError
from .profile import DEFAULT_TIMEOUT as PROFILE_TIMEOUT

TOKEN_ENV = "MORIIO_PROXY_ADMIN_TOKEN"
DEFAULT_TIMEOUT = 30.0
# drain --wait: how long the instance must show nothing in flight. Under serve --workers N
# the workers report their legs once a second, so a moment's zero is not proof.
QUIET_SECONDS = 2.5
_POLL_SECONDS = 0.5
_PROG = "moriio-proxy admin"


class Refused(Exception):
    """The proxy refused or the call failed; the message is the one line to print."""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """The ``admin`` subcommand, added to the CLI's subparsers."""
    parser = sub.add_parser(
        "admin",
        help="list, drain, eject, remove or add instances of a running proxy",
        description="Steer a running proxy through its admin API: list the instances, "
        "drain one for maintenance (no new requests, those in flight finish), undrain it, "
        "eject it for some seconds, remove it, add a static instance, or start and stop "
        "vLLM's profiler on every instance. Options go before ACTION. Exit status: 0 done, "
        "1 refused or failed, 2 bad usage.",
    )
    parser.add_argument("url", metavar="URL", help="the proxy, e.g. http://10.0.0.1:10001")
    parser.add_argument(
        "--token",
        default=None,
        help=f"admin token, sent as 'Authorization: Bearer TOKEN' [env {TOKEN_ENV}] "
        "(default: none)",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=None,
        help=f"seconds allowed for an action (default: {DEFAULT_TIMEOUT:g}), or for each "
        f"instance's answer to a profiler call ({PROFILE_TIMEOUT:g}: writing traces is slow)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the proxy's JSON answer instead of a line"
    )
    actions = parser.add_subparsers(
        dest="action",
        required=True,
        metavar="ACTION",
        help="list, drain, undrain, eject, remove, add, start-profile or stop-profile",
    )
    actions.add_parser("list", help="the registered instances, one line each")
    for name, summary in (
        ("drain", "no new requests to the instance; those in flight finish"),
        ("undrain", "let a drained instance take new requests again"),
        ("eject", "take the instance out of rotation for some seconds"),
        ("remove", "forget the instance now (if it still heartbeats, it comes back)"),
    ):
        action = actions.add_parser(name, help=summary, description=summary)
        _add_target(action)
        if name == "drain":
            action.add_argument(
                "--wait",
                type=positive(float),
                metavar="SECONDS",
                default=None,
                help="then wait, up to SECONDS, until nothing is in flight on it for "
                f"{QUIET_SECONDS:g}s in a row (exit 1 if it is still busy; it stays draining)",
            )
        if name == "eject":
            action.add_argument(
                "--seconds",
                type=positive(float),
                default=None,
                help="how long (default: the proxy's --eject-seconds)",
            )
    _add_add(actions)
    for name in ("start-profile", "stop-profile"):
        verb = name.split("-")[0]
        actions.add_parser(name, help=f"{verb} vLLM's profiler on every registered instance")
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "role", choices=ROLES, type=str.upper, help="P (prefill) or D (decode), any case"
    )
    parser.add_argument(
        "http_address", metavar="HTTP_ADDRESS", help="the instance's HOST:PORT, as listed"
    )


def _add_add(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add = actions.add_parser(
        "add",
        help="register a static instance (never evicted for silence)",
        description="Register an instance whose heartbeats cannot reach the proxy, as a "
        "static instance of the config file would be: checked the same way, never evicted "
        "for silence, forgotten by 'remove' or a restart of the proxy.",
    )
    add.add_argument(
        "--role", required=True, choices=ROLES, type=str.upper, help="P or D (any case)"
    )
    add.add_argument("--http-address", required=True, help="HOST:PORT of its OpenAI server")
    add.add_argument(
        "--zmq-address",
        required=True,
        help="its MoRI-IO handshake address, host:IP,handshake:PORT,notify:PORT",
    )
    add.add_argument(
        "--mode",
        required=True,
        choices=TRANSFER_MODES,
        type=str.upper,
        help="its KV transfer mode, READ or WRITE (any case)",
    )
    add.add_argument("--dp-size", type=int, default=1, help="its data-parallel size (default: 1)")
    add.add_argument("--tp-size", type=int, default=1, help="its tensor-parallel size (default: 1)")


def main(args: argparse.Namespace) -> int:
    """Run one admin command; print its answer; return the exit status."""
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    method, path, body = request_for(args)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    wait = args.timeout or DEFAULT_TIMEOUT
    if args.action in ("start-profile", "stop-profile"):
        wait = args.timeout or PROFILE_TIMEOUT
        path += f"?timeout={wait:g}"
        wait += 10.0  # the proxy's own answer comes after the slowest instance's
    try:
        status, answer = asyncio.run(_call(url + path, method, body, token, wait))
        if args.json:
            print(json.dumps(answer, indent=2))
        elif status < 400:
            print(render(args.action, answer))
        if status >= 400:
            raise Refused(_failure(status, answer))
        if args.action == "drain" and args.wait is not None:
            key = (args.role, args.http_address)
            idle = asyncio.run(_until_idle(url, key, token, args.wait))
            if not args.json:  # the exit status says it to a script
                print(idle, flush=True)
    except Refused as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """The HTTP method, path and JSON body of a parsed command."""
    action = args.action
    if action == "list":
        return "GET", "/admin/instances", None
    if action in ("start-profile", "stop-profile"):
        return "POST", "/" + action.replace("-", "_"), None
    if action == "add":
        body: dict[str, Any] = {
            "type": args.role,
            "http_address": args.http_address,
            "zmq_address": args.zmq_address,
            "transfer_mode": args.mode,
            "dp_size": args.dp_size,
            "tp_size": args.tp_size,
        }
    else:
        body = {"role": args.role, "http_address": args.http_address}
        if action == "eject" and args.seconds is not None:
            body["seconds"] = args.seconds
    return "POST", f"/admin/instances/{action}", body


async def _call(
    url: str, method: str, body: dict[str, Any] | None, token: str | None, timeout: float
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(method, url, json=body, headers=headers) as resp,
        ):
            text = await resp.text(errors="replace")
            status = resp.status
    except asyncio.TimeoutError:
        raise Refused(f"{url}: no answer within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise Refused(f"{url}: {exc}") from None
    try:
        return status, json.loads(text)
    except ValueError:
        if status >= 400:
            raise Refused(f"HTTP {status}: {' '.join(text.split())[:200]}") from None
        raise Refused(f"{url} did not answer JSON; is it a moriio-proxy?") from None


async def _until_idle(url: str, key: tuple[str, str], token: str | None, seconds: float) -> str:
    """Poll ``/admin/instances`` until the instance has had nothing in flight for
    QUIET_SECONDS (or is gone); Refused when ``seconds`` pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    quiet_since: float | None = None
    named = f"{key[0]} instance {key[1]}"
    while True:
        status, answer = await _call(url + "/admin/instances", "GET", None, token, DEFAULT_TIMEOUT)
        if status >= 400:
            raise Refused(_failure(status, answer))
        try:
            listing = AdminInstances.from_json(answer)
        except ViewError as exc:
            raise Refused(f"the answer of /admin/instances is malformed: {exc}") from None
        view = next((v for v in listing.instances if (v.role, v.http_address) == key), None)
        if view is None:
            return f"{named} is no longer registered"
        now = loop.time()
        quiet_since = None if view.inflight else (now if quiet_since is None else quiet_since)
        if quiet_since is not None and now - quiet_since >= QUIET_SECONDS:
            return f"nothing in flight on {named}"
        if now >= deadline and quiet_since is None:
            raise Refused(
                f"{view.inflight} request(s) still in flight on {named} after {seconds:g}s; "
                "it stays draining"
            )
        await asyncio.sleep(_POLL_SECONDS)


def _failure(status: int, answer: Any) -> str:
    """The one line that says why: the proxy's error message, else the failed instances."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"HTTP {status}: {error['message']}"
    if isinstance(answer, dict) and isinstance(answer.get("instances"), list):
        failed = [i for i in answer["instances"] if isinstance(i, dict) and i.get("error")]
        named = "; ".join(f"{i.get('role')} {i.get('http_address')}: {i['error']}" for i in failed)
        return f"HTTP {status}: failed on {len(failed)} instance(s): {named}"
    return f"HTTP {status}"


def render(action: str, answer: Any) -> str:
    """What a person reads: the instance table, an action's sentence, or profile results."""
    if not isinstance(answer, dict):
        return json.dumps(answer)
    if action == "list":
        try:
            listing = AdminInstances.from_json(answer)
        except ViewError as exc:
            raise Refused(f"the answer of /admin/instances is malformed: {exc}") from None
        if not listing.instances:
            return f"no instance registered (transfer mode {listing.transfer_mode or 'unset'})"
        return "\n".join(_row(v) for v in listing.instances)
    if "instances" in answer and isinstance(answer["instances"], list):  # profile fan-out
        return "\n".join(
            f"{i.get('role')} {i.get('http_address')}: {i.get('error') or 'ok'}"
            for i in answer["instances"]
            if isinstance(i, dict)
        )
    return str(answer.get("message", ""))


def _row(view: InstanceView) -> str:
    version = view.vllm_version or "version unknown"
    static = " static" if view.static else ""
    return (
        f"{view.role} {view.http_address:<24} {view.state:<9} inflight={view.inflight} "
        f"failures={view.consecutive_failures} {view.transfer_mode} dp={view.dp_size} "
        f"tp={view.tp_size} {version}{static}"
    )
