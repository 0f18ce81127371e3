"""``moriio-proxy sim``: its arguments and turning them into a running simulated instance.

It lives in the simulator's package (the proxy's CLI only adds it to its subcommands), so
it, like the rest of the simulator, imports nothing from the proxy.
"""

from __future__ import annotations

import argparse

from .instance import run_sim
from .settings import SimConfig, SimFaults


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> argparse.ArgumentParser:
    """The ``sim`` subcommand, added to the CLI's subparsers."""
    sim = sub.add_parser(
        "sim",
        help="run one simulated vLLM MoRI-IO instance",
        description="Run one simulated vLLM instance with the MoRI-IO connector: an "
        "OpenAI server that answers with deterministic words, KV transfers between "
        "simulated prefill and decode, and heartbeats to the proxy. Runs until SIGINT "
        "or SIGTERM.",
        formatter_class=formatter_class,
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
    add_mode(sim, "KV transfer mode it announces")
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
    sim.add_argument(
        "--profiler",
        action="store_true",
        help="serve POST /start_profile and /stop_profile (vLLM serves them only when "
        "started with --profiler-config; without this flag both answer 404 as vLLM does)",
    )
    _add_faults(sim)
    return sim


def add_mode(parser: argparse.ArgumentParser, help: str) -> None:
    """--mode of the simulated instances: READ or WRITE, in any case."""
    parser.add_argument(
        "--mode",
        choices=("READ", "WRITE"),
        default="READ",
        type=str.upper,
        help=f"{help} (any case)",
    )


def _add_faults(sim: argparse.ArgumentParser) -> None:
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


async def run(args: argparse.Namespace) -> int:
    """Run the instance ``args`` describe until SIGINT/SIGTERM (0) or engine death (1)."""

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
        profiler=args.profiler,
        faults=faults,
    )
    return await run_sim(config)
