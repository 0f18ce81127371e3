"""The ``moriio-proxy`` command: ``serve``, ``sim``, ``demo`` and ``check``.

Exit codes: 0 clean shutdown, 2 bad usage or configuration (one line on stderr), 1 for
anything else (a port already taken, an engine that died in the simulator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from . import __version__
from . import check as check_command
from .config import OPTIONS, ConfigError, ProxyConfig, load_config

log = logging.getLogger("moriio_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moriio-proxy",
        description="Prefill/decode proxy for vLLM's MoRI-IO KV connector.",
    )
    parser.add_argument("--version", action="version", version=f"moriio-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Flags override MORIIO_PROXY_* environment variables, "
        "which override the --config YAML file, which overrides the defaults shown.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML file of settings (and instances)")
    defaults = ProxyConfig()
    for option in OPTIONS:
        default = getattr(defaults, option.name)
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default) or "any"
        serve.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.name.split("_")[-1].upper(),
            help=f"{option.help} [env {option.env}] (default: {default})",
        )

    sim = sub.add_parser(
        "sim",
        help="run one simulated vLLM MoRI-IO instance",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--role", choices=("P", "D"), required=True, help="prefill or decode")
    sim.add_argument("--host", default="127.0.0.1", help="bind and advertised address")
    sim.add_argument("--port", type=int, default=0, help="HTTP port (0: any free port)")
    sim.add_argument(
        "--proxy", default="127.0.0.1:36367", help="HOST:PORT of the proxy's discovery port"
    )
    sim.add_argument("--mode", choices=("READ", "WRITE"), default="READ", type=str.upper)
    sim.add_argument("--dp-size", type=int, default=1)
    sim.add_argument("--tp-size", type=int, default=1)
    sim.add_argument("--model", default="sim-model")
    sim.add_argument("--handshake-port", type=int, default=0, help="base port (0: pick)")
    sim.add_argument("--notify-port", type=int, default=0, help="base port (0: pick)")
    sim.add_argument("--heartbeat-interval", type=float, default=3.0)
    sim.add_argument("--prefill-latency", type=float, default=0.0, help="seconds per prefill")
    sim.add_argument("--token-latency", type=float, default=0.0, help="seconds per token")
    sim.add_argument(
        "--prefill-token-latency",
        type=float,
        default=0.0,
        help="seconds per prompt token not in the prefix cache (a rank computes one prompt "
        "at a time)",
    )
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

    demo = sub.add_parser(
        "demo",
        help="proxy + 1 simulated P + 1 simulated D on localhost",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--port", type=int, default=10001, help="proxy HTTP port")
    demo.add_argument("--discovery-port", type=int, default=36367)
    demo.add_argument("--mode", choices=("READ", "WRITE"), default="READ", type=str.upper)
    demo.add_argument("--token-latency", type=float, default=0.02, help="seconds per token")
    check_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check_command.main(args)
    try:
        if args.command == "serve":
            cli_values = {o.name: getattr(args, o.name) for o in OPTIONS}
            config = load_config(cli_values, config_file=args.config)
            setup_logging(config.log_level)
            return run_loop(_serve(config), config.event_loop)
        if args.command == "sim":
            setup_logging("info")
            return asyncio.run(_sim(args))
        setup_logging("info")
        return asyncio.run(_demo(args))
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


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so shutdown is always the clean path."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve(config: ProxyConfig, stop: asyncio.Event | None = None) -> int:
    stop = stop or stop_event()
    if config.workers > 1:
        return await _supervise(config, stop)
    from .app import create_app, state
    from .server import bind_listener, serve

    try:
        app = create_app(config)
    except ImportError as exc:  # --discovery kubernetes without the k8s extra
        raise ConfigError(f"--discovery: {exc}") from None
    sock = bind_listener(config.host, config.port)
    try:
        await state(app).start()
    except OSError:
        sock.close()
        raise
    _log_serving(config, sock.getsockname()[1], state(app).discovery.bound_port)
    proxy = state(app)

    async def drain_then_stop() -> None:
        # SIGTERM: /ready turns 503 and new requests are refused at once; Hypercorn then
        # closes the listener and gives in-flight streams drain_timeout to finish.
        await stop.wait()
        proxy.drain()

    try:
        await serve(app, sock, drain_then_stop, graceful_timeout=config.drain_timeout)
    finally:
        await state(app).stop()
        sock.close()
    return 0


async def _supervise(config: ProxyConfig, stop: asyncio.Event) -> int:
    from .workers import Supervisor, WorkerStartError

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
        "moriio-proxy %s serving OpenAI on http://%s:%s%s (discovery: %s)",
        __version__,
        config.host,
        port,
        processes,
        where,
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
        prefill_token_latency=args.prefill_token_latency,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        control_port=args.control_port,
        seed=args.seed,
        faults=faults,
    )
    return await run_sim(config)


async def _demo(args: argparse.Namespace) -> int:
    from .sim import SimConfig, SimInstance

    stop = stop_event()
    config = load_config(
        {
            "host": "127.0.0.1",
            "port": args.port,
            "discovery_host": "127.0.0.1",
            "discovery_port": args.discovery_port,
        },
        env={},
    )
    proxy_task = asyncio.create_task(_serve(config, stop))
    await asyncio.sleep(0.3)  # the discovery port is bound before the sims start knocking
    if proxy_task.done():
        return proxy_task.result()
    sims: list[Any] = []
    try:
        for role in ("P", "D"):
            sim = SimInstance(
                SimConfig(
                    role=role,
                    proxy=f"127.0.0.1:{args.discovery_port}",
                    mode=args.mode,
                    token_latency=args.token_latency,
                    heartbeat_interval=1.0,
                )
            )
            await sim.start()
            sims.append(sim)
        print(_demo_banner(args.port, args.mode, sims), flush=True)
        await asyncio.wait(
            {proxy_task, asyncio.ensure_future(stop.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        stop.set()
        return await proxy_task
    finally:
        for sim in sims:
            await sim.stop()
        stop.set()


def _demo_banner(port: int, mode: str, sims: Sequence[Any]) -> str:
    url = f"http://127.0.0.1:{port}"
    lines = [
        f"moriio-proxy demo ({mode} mode) is up: proxy {url}",
        *(f"  simulated {s.config.role}: {s.url}  kv {s.zmq_address}" for s in sims),
        "",
        "Try it (Ctrl-C stops the demo):",
        f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' \\",
        '    -d \'{"model": "sim-model", "prompt": "The capital of France is", "max_tokens": 8}\'',
        f"  curl -s {url}/admin/instances",
    ]
    return "\n".join(lines)
