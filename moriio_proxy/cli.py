"""The ``moriio-proxy`` command: ``serve``, ``sim``, ``demo``, ``check`` and ``admin``.

Exit codes: 0 clean shutdown, 2 bad usage or configuration (one line on stderr), 1 for
anything else (a port already taken, an engine that died in the simulator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from . import check as check_command
from .admin import command as admin_command
from .config import OPTIONS, ConfigError, ProxyConfig, load_config
from .sim import command as sim_command

if TYPE_CHECKING:
    from .state import ProxyState

log = logging.getLogger("moriio_proxy")


class _HelpFormatter(argparse.HelpFormatter):
    """Adds an option's default to its help when there is one worth showing.

    argparse's ArgumentDefaultsHelpFormatter also prints ``(default: None)`` for an unset
    option and ``(default: False)`` for a switch, which tell the reader nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "(default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == ""
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moriio-proxy",
        description="Prefill/decode proxy for vLLM's MoRI-IO KV connector.",
    )
    parser.add_argument("--version", action="version", version=f"moriio-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    sim_command.add_parser(sub, _HelpFormatter)
    _add_demo(sub)
    check_command.add_parser(sub)
    admin_command.add_parser(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Flags override MORIIO_PROXY_* environment variables, "
        "which override the --config YAML file, which overrides the defaults shown. "
        "Choices are taken in any case (--transfer-mode read is READ).",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML file of settings (and instances)")
    defaults = ProxyConfig()
    for option in OPTIONS:
        help_text = option.help_line(getattr(defaults, option.name))
        # Unset (None): the environment, the file or the default decides.
        if option.switch:
            serve.add_argument(
                option.flag, dest=option.name, action="store_const", const=True, help=help_text
            )
            continue
        # A repeated option takes one or more values, as often as given (--api-key A B
        # --api-key C), which covers both ways vllm serve's --api-key is written.
        serve.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            action="extend" if option.repeated else "store",
            nargs="+" if option.repeated else None,
            metavar=option.metavar or option.name.split("_")[-1].upper(),
            help=help_text,
        )


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="proxy + 1 simulated P + 1 simulated D on localhost",
        description="Start the proxy with one simulated prefill and one simulated decode "
        "instance, all on 127.0.0.1 (no GPU, no vLLM), print a curl command to try once "
        "both instances are registered, and run until Ctrl-C.",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--port", type=int, default=10001, help="the proxy's HTTP port")
    demo.add_argument(
        "--discovery-port",
        type=int,
        default=36367,
        help="the proxy's discovery (ZMQ) port, where the simulated instances register",
    )
    sim_command.add_mode(demo, "KV transfer mode of both simulated instances")
    demo.add_argument(
        "--token-latency", type=float, default=0.02, help="seconds per generated token"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check_command.main(args)
    if args.command == "admin":
        return admin_command.main(args)
    try:
        if args.command == "serve":
            cli_values = {o.name: getattr(args, o.name) for o in OPTIONS}
            config = load_config(cli_values, config_file=args.config)
            setup_logging(config.log_level)
            return exit_quickly(run_loop(run_proxy(config), config.event_loop))
        if args.command == "sim":
            setup_logging("info")
            return exit_quickly(asyncio.run(sim_command.run(args)))
        from .demo import run_demo

        setup_logging("info")
        return exit_quickly(asyncio.run(run_demo(args)))
    except ConfigError as exc:
        print(f"moriio-proxy: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a simulator setting the dataclass refused
        print(f"moriio-proxy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"moriio-proxy: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def exit_quickly(code: int) -> int:
    """Let the interpreter's teardown skip collecting the objects a server run left behind.

    Everything is closed by then, but the exit itself collected every object quart,
    aiohttp and the rest made: 0.1 s on an idle machine, 0.5 s and more on a loaded one,
    after an idle proxy had already stopped. Frozen objects are skipped by those
    collections (about a fifth of the time); atexit handlers and stream flushes still run.
    Only for a process about to exit: frozen objects are never collected.
    """
    gc.freeze()
    return code


def run_loop(main: Coroutine[Any, Any, int], event_loop: str = "auto") -> int:
    """Run ``main`` on uvloop when it is installed (``auto``) or asked for, else asyncio.

    uvloop's C event loop and transports cost the proxy about a quarter less CPU per
    upstream call than asyncio's in our profiles; ``--event-loop asyncio`` is the escape
    hatch for debugging.
    """
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise ConfigError(
                    "--event-loop uvloop: uvloop is not installed (pip install uvloop)"
                ) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def reload_on_sighup(reload: Callable[[], object]) -> None:
    """SIGHUP reads the client keys file again (the usual daemon convention); requests in
    flight are not touched. Where the loop takes no signal handlers (a thread), nothing."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload)


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so shutdown is always the clean path."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def run_proxy(
    config: ProxyConfig,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[ProxyState], None] | None = None,
) -> int:
    """Serve until ``stop`` (SIGINT/SIGTERM); ``on_serving`` gets the state once both ports
    listen (the demo starts its simulated instances then)."""
    stop = stop or stop_event()
    if config.otlp_traces_endpoint:
        from .state import require_tracing

        require_tracing()  # one clear line before any process starts, not one per worker
    from .security import server_tls

    tls = server_tls(config)  # a bad certificate is a one-line error before anything binds
    if config.workers > 1:
        return await _supervise(config, stop)
    from .app import create_app, state
    from .server import bind_listener, serve_configured

    try:
        app = create_app(config)
    except ImportError as exc:  # --discovery kubernetes without the k8s extra
        raise ConfigError(f"--discovery: {exc}") from None
    reload_on_sighup(state(app).keys.reload)
    sock = bind_listener(config.host, config.port)
    try:
        await state(app).start()
    except OSError:
        sock.close()
        raise
    proxy = state(app)
    _log_serving(config, sock.getsockname()[1], proxy.discovery.bound_port)
    if on_serving is not None:
        on_serving(proxy)

    async def drain_then_stop() -> None:
        # SIGTERM: /ready turns 503 and new requests are refused at once; Hypercorn then
        # closes the listener and gives in-flight streams drain_timeout to finish.
        await stop.wait()
        proxy.drain()

    try:
        await serve_configured(app, sock, drain_then_stop, config, tls)
    finally:
        await state(app).stop()
        sock.close()
    return 0


async def _supervise(config: ProxyConfig, stop: asyncio.Event) -> int:
    from .security import KeyRing
    from .workers import Supervisor, WorkerStartError

    KeyRing(config.api_key, config.api_key_file)  # a bad keys file fails before any worker
    try:
        supervisor = Supervisor(config, on_ready=lambda port: None)
    except ImportError as exc:  # --discovery kubernetes without the k8s extra
        raise ConfigError(f"--discovery: {exc}") from None
    supervisor.on_ready = lambda port: _log_serving(
        config, port, supervisor.discovery.bound_port, workers=config.workers
    )
    try:
        return await supervisor.run(stop)
    except WorkerStartError as exc:
        log.error("%s", exc)
        return 1


def _log_serving(
    config: ProxyConfig, port: int, discovery_port: int | None, workers: int = 1
) -> None:
    where = (
        f"pods {config.k8s_prefill_selector!r} / {config.k8s_decode_selector!r}"
        if config.discovery == "kubernetes"
        else f"tcp://{config.discovery_host}:{discovery_port or config.discovery_port}"
    )
    processes = f" with {workers} workers" if workers > 1 else ""
    log.info(
        "moriio-proxy %s serving OpenAI on %s://%s:%s%s (discovery: %s)",
        __version__,
        "https" if config.certfile else "http",
        config.host,
        port,
        processes,
        where,
    )
    if (
        config.discovery == "zmq"
        and "discovery_host" not in config.given
        and not config.discovery_allow
    ):
        _warn_open_discovery(config)


def _warn_open_discovery(config: ProxyConfig) -> None:
    """Warn when discovery was left open to the world by default.

    --host does not move discovery (vLLM instances on other hosts must reach it while
    clients may be local), which surprises whoever bound --host to 127.0.0.1; and anything
    that reaches the port can register an instance and receive traffic. An operator who
    set --discovery-host chose where it listens and is not told again.
    """
    from .discovery.zmq import every_interface

    if every_interface(config.discovery_host):
        log.warning(
            "discovery takes registrations from any host on every interface: "
            "--discovery-host (default %s) is separate from --host; set it or "
            "--discovery-allow (README: Security)",
            config.discovery_host,
        )
