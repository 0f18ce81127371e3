"""What long-lived streams cost the proxy: memory per idle stream, and 10,000 slow streams.

Two phases, each with a proxy and simulated instances of its own (separate processes):

* idle: N streams (1,000 by default) that get their first token and then nothing; the
  proxy's memory with them open, minus its memory before, per 1,000 streams; its client
  and upstream sockets; everything released once the client hangs up.
* slow: N streams (10,000 by default), one token a second each, opened over a ramp and
  run to their end; every stream checked, the proxy's memory sampled throughout (flat?),
  the CPU of every process, descriptors per worker.

    .venv/bin/python bench/bench_streams.py                      # both phases (~6 min)
    .venv/bin/python bench/bench_streams.py --phases idle        # idle only (~1 min)
    .venv/bin/python bench/bench_streams.py --slow-streams 2000  # a smaller slow phase
    .venv/bin/python bench/bench_streams.py --update             # the committed results

Results go to bench/results/scratch/<time>/ (git-ignored) unless --update, which also
writes the committed bench/results/streams.{json,md}. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import options, runinfo  # noqa: E402
from bench.streams import deployment  # noqa: E402
from bench.streams.phases import Load, idle_phase, slow_phase  # noqa: E402
from bench.streams.report import markdown, verdicts  # noqa: E402
from bench.streams.sampling import machine_cores  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--phases", default="idle,slow", help="idle, slow or idle,slow")
    parser.add_argument("--mode", default="READ", choices=("READ", "WRITE"))
    parser.add_argument("--warmup", type=int, default=300, help="ordinary streams first")
    idle = parser.add_argument_group("idle phase")
    idle.add_argument("--idle-streams", type=int, default=1000)
    idle.add_argument("--idle-rounds", type=int, default=2, help="open, hold, close; repeated")
    idle.add_argument("--idle-ramp", type=float, default=10.0, help="seconds to open them")
    idle.add_argument("--idle-hold", type=float, default=10.0, help="seconds held open")
    idle.add_argument("--idle-workers", type=int, default=1, help="proxy --workers")
    idle.add_argument("--idle-decodes", type=int, default=1, help="simulated D")
    idle.add_argument(
        "--tracemalloc",
        action="store_true",
        help="run the idle proxy under tracemalloc and report where its memory went "
        "(its RSS is then not a figure of record)",
    )
    slow = parser.add_argument_group("slow phase")
    slow.add_argument("--slow-streams", type=int, default=10000)
    slow.add_argument("--slow-ramp", type=float, default=60.0, help="seconds to open them")
    slow.add_argument(
        "--slow-tokens",
        type=int,
        default=240,
        help="max_tokens of each (tokens beyond the ramp make the steady window)",
    )
    slow.add_argument("--token-latency", type=float, default=1.0, help="D's seconds per token")
    slow.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    slow.add_argument(
        "--slow-workers",
        type=int,
        default=2,
        help="proxy --workers: a worker holds two descriptors per stream",
    )
    slow.add_argument("--slow-decodes", type=int, default=4, help="simulated D")
    options.add_proxy_arg(parser)
    options.add_results_options(parser, "streams")
    args = parser.parse_args(argv)
    options.check_out(parser, args.out)
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    if args.tracemalloc and args.idle_workers != 1:
        parser.error("--tracemalloc traces one process: use it with --idle-workers 1")
    for phase in args.phase_list:
        if phase not in ("idle", "slow"):
            parser.error(f"--phases: unknown phase {phase!r}")
    return args


def raise_fd_limit() -> int:
    """The soft descriptor limit raised to the hard one (the load generator holds one per
    stream); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def run_phase(
    name: str,
    logs: Path,
    args: argparse.Namespace,
    proxy_args: list[str],
    decodes: int,
    decode_args: list[str],
    body: Any,
    launcher: tuple[str, ...] = ("-m", "moriio_proxy"),
) -> dict[str, Any]:
    """Start a deployment, run ``body(deployment)`` in it, stop it."""
    busy = machine_cores()
    print(
        f"{name}: other work uses {busy:.2f} cores; starting the proxy and simulators", flush=True
    )
    dep = deployment.start(
        logs,
        name,
        mode=args.mode,
        proxy_args=proxy_args,
        prefills=1,
        decodes=decodes,
        decode_args=decode_args,
        launcher=launcher,
    )
    try:
        result: dict[str, Any] = await body(dep)
    finally:
        dep.stop()
    result["others_before"] = busy
    result["proxy_args"] = proxy_args
    result["decodes"] = decodes
    result["decode_args"] = decode_args
    result["logs"] = str(logs)
    return result


async def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"run": describe_run(args)}
    if "idle" in args.phase_list:
        load = Load(args.idle_streams, args.idle_ramp, 16)
        proxy_args = ["--workers", str(args.idle_workers), *args.proxy_arg]
        snapshots = out / "tracemalloc" if args.tracemalloc else None
        launcher: tuple[str, ...] = ("-m", "moriio_proxy")
        if snapshots is not None:
            snapshots.mkdir(exist_ok=True)
            launcher = ("-m", "bench.streams.traced", str(snapshots))

        def idle(dep: deployment.Deployment) -> Coroutine[Any, Any, dict[str, Any]]:
            return idle_phase(dep, load, args.idle_rounds, args.idle_hold, args.warmup, snapshots)

        report["idle"] = await run_phase(
            "idle", logs, args, proxy_args, args.idle_decodes, [], idle, launcher
        )
    if "slow" in args.phase_list:
        load = Load(args.slow_streams, args.slow_ramp, args.slow_tokens)
        # --max-inflight is per worker; the kernel spreads connections unevenly over them.
        proxy_args = [
            "--workers", str(args.slow_workers), "--max-inflight", str(args.slow_streams),
            *args.proxy_arg,
        ]  # fmt: skip
        d_args = ["--token-latency", f"{args.token_latency:g}"]

        def slow(dep: deployment.Deployment) -> Coroutine[Any, Any, dict[str, Any]]:
            return slow_phase(dep, load, args.token_latency, args.sample_every, args.warmup)

        report["slow"] = await run_phase(
            "slow", logs, args, proxy_args, args.slow_decodes, d_args, slow
        )
    report["run"]["load_at_end"] = runinfo.load()
    report["verdicts"] = verdicts(report)
    return report


def describe_run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "when": runinfo.now(),
        "machine": runinfo.machine(),
        "moriio_proxy": runinfo.moriio_proxy(),
        "python": platform.python_version(),
        "command": runinfo.command("bench_streams.py"),
        "fd_limit": raise_fd_limit(),
        "mode": args.mode,
        "warmup": args.warmup,
    }


def run_in_loop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """On uvloop when installed (as the proxy runs): the load generator's own cost per
    event is then lower, and it shares the cores with what it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = runinfo.results_folder(args.out, "streams-")
    report = run_in_loop(run(args, out))
    runinfo.write_results(out, "streams", report, markdown(report), args.update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
