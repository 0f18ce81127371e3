"""What a proxy costs: moriio-proxy and vllm-router against the floor, side by side.

For each mode, three targets are started, each with its own identical simulated instances
(``moriio-proxy sim``, zero latency): the floor (the load generator sends both legs to the
simulators itself), moriio-proxy and vllm-router (MoRI-IO mode). Then every cell (streaming
or not, at each concurrency) is run against each target in turn: warm-up, a measured window,
the next target. See bench/README.md for what each column means.

    .venv/bin/python bench/bench_overhead.py                  # READ, c=1,64,256, both
    .venv/bin/python bench/bench_overhead.py --quick          # a short smoke run
    .venv/bin/python bench/bench_overhead.py --install-vllm-router --modes READ,WRITE
    .venv/bin/python bench/bench_overhead.py --profile        # + py-spy of one cell
    .venv/bin/python bench/bench_overhead.py --update         # the committed baseline

Results go to bench/results/scratch/<time>/ (git-ignored) unless --update, which also
writes the committed bench/results/overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import options, runinfo  # noqa: E402
from bench.overhead import profile as pyspy  # noqa: E402
from bench.overhead import vllm_router  # noqa: E402
from bench.overhead.cells import Cell, Measurement, Settings, run_cell, summarize  # noqa: E402
from bench.overhead.loadgen import Window  # noqa: E402
from bench.overhead.report import compare_with_floor, markdown, summary  # noqa: E402
from bench.overhead.targets import (  # noqa: E402
    Target,
    start_floor,
    start_moriio_proxy,
    start_vllm_router,
)
from bench.overhead.workers import WorkerPool  # noqa: E402
from bench.processes import StartError  # noqa: E402
from moriio_proxy.protocol import TransferMode  # noqa: E402

TARGETS = ("floor", "moriio-proxy", "vllm-router", "moriio-proxy-2w")
# Measured unless --targets says otherwise; moriio-proxy-2w (serve --workers 2) is asked for
# by name: on a 2-core machine its two workers compete with the load generator.
DEFAULT_TARGETS = TARGETS[:3]
# (warm-up s, window s, rounds): 18 cells x 3 targets x 3 rounds of ~6.5 s = about 6 minutes
DEFAULT_TIMES = (2.0, 4.0, 3)
MAX_RESTARTS = 2  # per target and mode: relaunches after one of its processes exited
QUICK_TIMES = (1.0, 3.0, 1)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None of options whose default depends on --quick."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action) or ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0], formatter_class=_Help
    )
    parser.add_argument("--modes", default="READ", help="READ, WRITE or READ,WRITE")
    parser.add_argument("--concurrency", default="1,64,256", help="comma-separated")
    parser.add_argument(
        "--stream", choices=("both", "yes", "no"), default="both", help="streamed requests?"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument(
        "--warmup", type=float, help=f"seconds before each window (default {DEFAULT_TIMES[0]:g})"
    )
    parser.add_argument(
        "--duration", type=float, help=f"measured seconds a round (default {DEFAULT_TIMES[1]:g})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per cell, interleaved with the other targets' and pooled "
        f"(default {DEFAULT_TIMES[2]})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: defaults of {:g} s warm-up, {:g} s window, {} round".format(*QUICK_TIMES),
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)}",
    )
    parser.add_argument("--prefills", type=int, default=1, help="simulated P per target")
    parser.add_argument("--decodes", type=int, default=2, help="simulated D per target")
    parser.add_argument("--loadgen-workers", type=int, default=2, help="load-generator processes")
    vllm_router.add_arguments(parser)
    options.add_proxy_arg(parser)
    parser.add_argument("--profile", action="store_true", help="py-spy one cell of moriio-proxy")
    parser.add_argument(
        "--profile-cell",
        default="non-stream:64",
        metavar="STREAM:C",
        help="the profiled cell (first mode), stream:C or non-stream:C",
    )
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed")
    options.add_results_options(parser, "overhead")
    args = parser.parse_args(argv)
    vllm_router.check_arguments(parser, args)
    options.check_out(parser, args.out)
    defaults = QUICK_TIMES if args.quick else DEFAULT_TIMES
    for name, default in zip(("warmup", "duration", "rounds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.mode_list = [m.strip().upper() for m in args.modes.split(",") if m.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in args.target_list:
        if name not in TARGETS:
            parser.error(f"--targets: unknown target {name!r} (known: {', '.join(TARGETS)})")
    for mode in args.mode_list:
        if mode not in ("READ", "WRITE"):
            parser.error(f"--modes: {mode!r} is neither READ nor WRITE")
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.streams = {"both": [False, True], "yes": [True], "no": [False]}[args.stream]
    stream_text, _, c_text = args.profile_cell.partition(":")
    if stream_text not in ("stream", "non-stream") or not c_text.isdigit():
        parser.error("--profile-cell wants stream:C or non-stream:C, e.g. non-stream:64")
    args.profile_stream, args.profile_c = stream_text == "stream", int(c_text)
    return args


def describe_run(args: argparse.Namespace, router: vllm_router.Located) -> dict[str, Any]:
    return {
        "when": runinfo.now(),
        "machine": runinfo.machine(),
        "moriio_proxy": runinfo.moriio_proxy(),
        "vllm_router": vllm_router.describe(router),
        "python": platform.python_version(),
        "command": runinfo.command("bench_overhead.py"),
        "settings": (
            f"{args.max_tokens} max_tokens; c closed-loop clients; {args.rounds} round(s) of "
            f"{args.warmup:g} s warm-up then {args.duration:g} s measured, the targets' rounds "
            f"interleaved, rounds pooled; {args.prefills} simulated P and "
            f"{args.decodes} simulated D per target (zero latency, fresh per target and mode); "
            f"load generator in {args.loadgen_workers} processes"
        ),
        "max_tokens": args.max_tokens,
        "warmup_seconds": args.warmup,
        "window_seconds": args.duration,
        "rounds": args.rounds,
        "prefills": args.prefills,
        "decodes": args.decodes,
        "loadgen_workers": args.loadgen_workers,
        "proxy_args": args.proxy_arg,
    }


def start_target(
    name: str, mode: str, args: argparse.Namespace, logs: Path, router: str | None
) -> Target:
    if name == "floor":
        return start_floor(mode, logs, args.prefills, args.decodes)
    if name == "moriio-proxy":
        return start_moriio_proxy(mode, logs, args.prefills, args.decodes, args.proxy_arg)
    if name == "moriio-proxy-2w":
        extra = [*args.proxy_arg, "--workers", "2"]
        return start_moriio_proxy(mode, logs, args.prefills, args.decodes, extra, name=name)
    assert router is not None
    return start_vllm_router(router, mode, logs, args.prefills, args.decodes)


def print_round(name: str, m: Measurement, settings: Settings) -> None:
    ok = len(m.outcome.latencies)
    cpu = "" if m.target_cpu is None or not ok else f"  CPU {m.target_cpu * 1000 / ok:.2f} ms/req"
    errors = sum(m.outcome.errors.values())
    others = max(0.0, m.machine_cpu - m.ours_cpu) / m.seconds
    print(
        f"  {name:<13} {ok / settings.duration:>8.1f} req/s{cpu}"
        f"  errors {errors}  (others {others:.2f} cores)",
        flush=True,
    )


def profile_cell(
    pool: WorkerPool, target: Target, cell: Cell, settings: Settings, out: Path, top: int
) -> dict[str, Any]:
    """A separate pass of ``cell`` with py-spy recording the proxy through its window."""
    binary = pyspy.py_spy()
    raw = out / f"profile-{target.name}-{cell.mode}-{'stream' if cell.stream else 'non-stream'}"
    raw = raw.with_name(raw.name + f"-c{cell.concurrency}.txt")
    assert target.pid is not None
    recorders = []

    def record(window: Window) -> None:
        recorders.append(pyspy.start(binary, target.pid or 0, window.stop - window.measure, raw))

    m = run_cell(pool, target, cell, settings, during=record)
    recorders[0].wait(timeout=60)
    if not raw.exists():
        log = raw.with_suffix(".log")
        raise RuntimeError(f"py-spy wrote no profile; its output:\n{log.read_text()[-2000:]}")
    summary = pyspy.summarize(raw, top)
    return {
        "cell": cell.label,
        "seconds": settings.duration,
        "req_per_s": round(len(m.outcome.latencies) / settings.duration, 1),
        "raw": str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw),
        **summary,
    }


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    wanted = "vllm-router" in args.target_list
    located = vllm_router.find(args, wanted, "not requested (--targets)")
    router_path = located.binary
    if wanted and router_path is None:
        skipped.append(f"vllm-router, every cell: {located.how}")
    report: dict[str, Any] = {
        "run": describe_run(args, located),
        "skipped": skipped,
        "warnings": [],
        "results": [],
        "targets": {},
    }
    settings = Settings(args.max_tokens, args.warmup, args.duration)
    pool = WorkerPool(args.loadgen_workers)
    try:
        for mode in args.mode_list:
            run_mode(args, mode, settings, pool, logs, router_path, report, out)
    finally:
        pool.close()
    report["warnings"] += compare_with_floor(report["results"])
    report["summary"] = summary(report["results"])
    for row in report["results"]:
        if row["errors_total"]:
            report["warnings"].append(
                f"{row['target']} {Cell(row['mode'], row['stream'], row['concurrency']).label}: "
                f"{row['errors_total']} failed or wrong answers ({row['errors']})"
            )
    return report


def run_mode(
    args: argparse.Namespace,
    mode: TransferMode,
    settings: Settings,
    pool: WorkerPool,
    logs: Path,
    router_path: str | None,
    report: dict[str, Any],
    out: Path,
) -> None:
    targets: list[Target] = []
    try:
        for name in args.target_list:
            if name == "vllm-router" and router_path is None:
                continue
            print(f"starting {name} ({mode}) ...", flush=True)
            try:
                targets.append(start_target(name, mode, args, logs, router_path))
            except StartError as exc:
                report["skipped"].append(f"{name} {mode}, every cell: did not start: {exc}")
                print(f"!!! {name} ({mode}) did not start, SKIPPED:\n{exc}", flush=True)
        cells = [Cell(mode, s, c) for c in args.concurrencies for s in args.streams]
        rounds: dict[tuple[Cell, str], list[Measurement]] = {}
        restarts = {t.name: 0 for t in targets}
        for r in range(args.rounds):
            for n, cell in enumerate(cells):
                print(f"{cell.label}, round {r + 1}/{args.rounds}", flush=True)
                # Alternate the order so a drift on the machine favours no target.
                order = list(range(len(targets)))
                for i in order if (n + r) % 2 == 0 else order[::-1]:
                    where = f"{targets[i].name} {cell.label} round {r + 1}"
                    while True:
                        target = targets[i]
                        if target.name not in restarts:  # gave up on it
                            break
                        m = run_cell(pool, target, cell, settings) if target.alive() else None
                        if m is not None and target.alive():
                            rounds.setdefault((cell, target.name), []).append(m)
                            print_round(target.name, m, settings)
                            break
                        # One of its processes exited (on a shared machine, someone else's
                        # cleanup may kill it): a window it was not in counts for nothing.
                        print(f"!!! {where}: a process of it exited; restarting", flush=True)
                        target.stop()
                        restarts[target.name] += 1
                        fresh = None
                        if restarts[target.name] <= MAX_RESTARTS:
                            with contextlib.suppress(StartError):
                                fresh = start_target(target.name, mode, args, logs, router_path)
                        if fresh is None:
                            del restarts[target.name]
                            report["skipped"].append(
                                f"{where} and after: its processes kept exiting (logs in {logs})"
                            )
                            break
                        targets[i] = fresh
                        report["warnings"].append(
                            f"{where}: a process of it exited during the window; restarted "
                            "with fresh simulators and measured again"
                        )
                    time.sleep(0.3)
        for cell in cells:
            for target in targets:
                if (cell, target.name) in rounds:
                    row = summarize(target, cell, settings, rounds[(cell, target.name)])
                    report["results"].append(row)
        proxy = next((t for t in targets if t.name == "moriio-proxy"), None)
        if args.profile and mode == args.mode_list[0] and proxy is not None:
            cell = Cell(mode, args.profile_stream, args.profile_c)
            print(f"profiling moriio-proxy, {cell.label} ...", flush=True)
            report["profile"] = profile_cell(pool, proxy, cell, settings, out, args.profile_top)
        for target in targets:
            stats = target.sim_stats()
            report["targets"][f"{target.name} {mode}"] = {
                "notes": target.notes,
                "log": str(target.log) if target.log else None,
                "sim_requests": {s["url"]: [s["role"], s.get("requests")] for s in stats},
            }
            idle = [s["url"] for s in stats if s.get("requests") == 0]
            if idle:  # a target that never used an instance was not measured as configured
                report["warnings"].append(
                    f"{target.name} {mode}: simulated instance(s) {', '.join(idle)} "
                    "received no request"
                )
    finally:
        for target in targets:
            target.stop()
    # cells are sorted per table: floor first within each cell, then the proxies
    rank = {name: i for i, name in enumerate(TARGETS)}
    report["results"].sort(
        key=lambda r: (r["mode"], r["concurrency"], r["stream"], rank[r["target"]])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = runinfo.results_folder(args.out, "")
    report = run(args, out)
    text = markdown(report)
    runinfo.write_results(out, "overhead", report, text, args.update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
