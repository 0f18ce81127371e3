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
    _addrun_proxy(sub)
    _add_sim(sub)
    _add_demo(sub)
    check_command.add_parser(sub)
    admin_command.add_parser(sub)
    return parser


def _addrun_proxy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser(
        "sim",
        help="run one simulated vLLM MoRI-IO instance",
        description="Run one simulated vLLM instance with the MoRI-IO connector: an "
        "OpenAI server that answers with deterministic words, KV transfers between "
        "simulated prefill and decode, and heartbeats to the proxy. Runs until SIGINT "
        "or SIGTERM.",
        formatter_class=_HelpFormatter,
    )
    sim.add_argument(
        "--role",
        choices=("P", "D"),
        required=True,
        type=str.upper,
        help="prefill (P) or decode (D) instance (any case)",
    )
    sim.add_argument("--host", default="127.0.0.1", help="bind and advertised address")
    sim.add_argument("--port", type=int, default=0, help="HTTP port (0: any free port)")
    sim.add_argument(
        "--proxy",
        default="127.0.0.1:36367",
        help="HOST:PORT of the proxy's discovery port (empty: send no heartbeats)",
    )
    _add_mode(sim, "KV transfer mode it announces")
    sim.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks it serves")
    sim.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size it announces")
    sim.add_argument("--model", default="sim-model", help="model name it serves")
    sim.add_argument(
        "--handshake-port",
        type=int,
        default=0,
        help="first MoRI-IO handshake port, one per DP rank (0: pick free ones)",
    )
    sim.add_argument(
        "--notify-port",
        type=int,
        default=0,
        help="first MoRI-IO notify port, one per DP rank (0: pick free ones)",
    )
    sim.add_argument(
        "--heartbeat-interval",
        type=float,
        default=3.0,
        help="seconds between heartbeats to the proxy (vLLM sends one every 3 s)",
    )
    sim.add_argument(
        "--prefill-latency", type=float, default=0.0, help="seconds each prefill takes"
    )
    sim.add_argument("--token-latency", type=float, default=0.0, help="seconds per generated token")
    sim.add_argument(
        "--vllm-version",
        choices=("0.32", "0.33"),
        default="0.33",
        help="the vLLM release to behave as (GET /version, and where 0.32 and 0.33 differ)",
    )
    sim.add_argument(
        "--defer-timeout",
        type=float,
        default=60.0,
        help="seconds a prefill keeps KV for its decode (0.33 WRITE: then sends write_failed)",
    )
    sim.add_argument(
        "--prefill-token-latency",
        type=float,
        default=0.0,
        help="seconds per prompt token not in the prefix cache (a rank computes one prompt "
        "at a time)",
    )
    sim.add_argument(
        "--ssl-certfile",
        help="serve the OpenAI port over HTTPS with this certificate (PEM), as vLLM's flag",
    )
    sim.add_argument("--ssl-keyfile", help="private key (PEM) of --ssl-certfile")
    sim.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    sim.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=65_536,
        dest="num_gpu_blocks",
        help="KV blocks per DP rank: the prefix cache's capacity",
    )
    sim.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep computed prompt blocks for later requests",
    )
    sim.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens",
    )
    _add_sim_faults(sim)


def _add_mode(parser: argparse.ArgumentParser, help: str) -> None:
    """--mode of the simulated instances: READ or WRITE, in any case."""
    parser.add_argument(
        "--mode",
        choices=("READ", "WRITE"),
        default="READ",
        type=str.upper,
        help=f"{help} (any case)",
    )


def _add_sim_faults(sim: argparse.ArgumentParser) -> None:
    faults = sim.add_argument_group(
        "fault injection",
        "Faults for generation requests (/v1/completions, /v1/chat/completions) that pass "
        "validation; /health, /v1/models and /sim/* are never faulted. Change them at run "
        "time with POST (replace) or PATCH (update) /sim/faults; GET /sim/stats shows what "
        "was applied.",
    )
    faults.add_argument(
        "--fail-status",
        type=int,
        metavar="N",
        help="answer with HTTP status N (400-599) and vLLM's error JSON instead of serving",
    )
    faults.add_argument(
        "--die-after-tokens",
        type=int,
        metavar="K",
        help="cut the connection after K generated tokens: no final chunk, no [DONE] "
        "(non-streaming: no response at all)",
    )
    faults.add_argument(
        "--stall-first-byte",
        type=float,
        metavar="S",
        help="send nothing, headers included, for S seconds ('inf': until the client leaves)",
    )
    faults.add_argument(
        "--stall-after-tokens",
        metavar="K:S",
        help="go silent for S seconds ('inf': forever) after K tokens, connection kept open",
    )
    faults.add_argument(
        "--refuse-connections",
        action="store_true",
        help="start with the HTTP port closed (connection refused) while heartbeats continue",
    )
    faults.add_argument(
        "--fault-probability",
        type=float,
        default=1.0,
        metavar="P",
        help="fraction of generation requests the faults apply to",
    )
    faults.add_argument(
        "--seed", type=int, metavar="N", help="seed of the per-request fault draws (repeatable)"
    )
    faults.add_argument(
        "--control-port",
        type=int,
        metavar="N",
        help="also serve /sim/faults and /sim/stats on port N, which --refuse-connections "
        "never closes (0: any free port; without it /sim/* is on the HTTP port only)",
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
    _add_mode(demo, "KV transfer mode of both simulated instances")
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
            return exit_quickly(asyncio.run(_sim(args)))
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


async def _sim(args: argparse.Namespace) -> int:
    from .sim import SimConfig, SimFaults, run_sim

    stall_after: tuple[int, float] | None = None
    if args.stall_after_tokens is not None:
        tokens, _, seconds = args.stall_after_tokens.partition(":")
        try:
            stall_after = (int(tokens), float(seconds))
        except ValueError:
            raise ValueError(
                f"--stall-after-tokens wants K:S (e.g. 3:inf), got {args.stall_after_tokens!r}"
            ) from None
    faults = SimFaults(
        status=args.fail_status,
        die_after_tokens=args.die_after_tokens,
        stall_first_byte=args.stall_first_byte,
        stall_after_tokens=stall_after,
        refuse_connections=args.refuse_connections,
        probability=args.fault_probability,
    )
    faults.validate()
    config = SimConfig(
        role=args.role,
        host=args.host,
        port=args.port,
        proxy=args.proxy or None,
        mode=args.mode,
        dp_size=args.dp_size,
        tp_size=args.tp_size,
        model=args.model,
        handshake_port=args.handshake_port,
        notify_port=args.notify_port,
        heartbeat_interval=args.heartbeat_interval,
        prefill_latency=args.prefill_latency,
        token_latency=args.token_latency,
        defer_timeout=args.defer_timeout,
        vllm_version=args.vllm_version,
        prefill_token_latency=args.prefill_token_latency,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        control_port=args.control_port,
        seed=args.seed,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        faults=faults,
    )
    return await run_sim(config)
