"""The results: comparisons with the floor, warnings, and the JSON and markdown files."""

from __future__ import annotations

from typing import Any

# Under load, the floor must serve this many times a proxy's throughput, or that proxy's
# req/s is set by the simulators and load generator, not by the proxy.
FLOOR_MARGIN = 1.5


def _key(row: dict[str, Any]) -> tuple[str, bool, int]:
    return (row["mode"], row["stream"], row["concurrency"])


def compare_with_floor(rows: list[dict[str, Any]]) -> list[str]:
    """Fill in each row's added latency over the floor; return warnings about the floor."""
    floors = {_key(r): r for r in rows if r["target"] == "floor"}
    warnings = []
    for row in rows:
        floor = floors.get(_key(row))
        if row["target"] == "floor" or floor is None:
            row["added_p50_ms_over_floor"] = None
            row["floor_throughput_ratio"] = None
            continue
        p50, floor_p50 = row["latency_ms"]["p50"], floor["latency_ms"]["p50"]
        added = None if p50 is None or floor_p50 is None else round(p50 - floor_p50, 2)
        row["added_p50_ms_over_floor"] = added
        ratio = floor["req_per_s"] / row["req_per_s"] if row["req_per_s"] else None
        row["floor_throughput_ratio"] = round(ratio, 2) if ratio is not None else None
        if row["concurrency"] > 1 and ratio is not None and ratio < FLOOR_MARGIN:
            warnings.append(
                f"{row['target']} {_cell(row)}: the floor served only {ratio:.2f}x its "
                f"req/s (wanted >= {FLOOR_MARGIN}x): its throughput here is limited by the "
                "simulators and load generator sharing the cores; compare CPU ms/req instead"
            )
    return warnings


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's figures alone, one flat record per row: what a later run is diffed against
    (the rows keep the detail; a profile, when run, is kept apart under "profile")."""
    return [
        {
            "target": r["target"],
            "mode": r["mode"],
            "stream": r["stream"],
            "concurrency": r["concurrency"],
            "req_per_s": r["req_per_s"],
            "p50_ms": r["latency_ms"]["p50"],
            "p99_ms": r["latency_ms"]["p99"],
            "ttft_p50_ms": r["ttft_ms"]["p50"] if r["ttft_ms"] else None,
            "added_p50_ms_over_floor": r["added_p50_ms_over_floor"],
            "cpu_ms_per_req": r["cpu"]["target_ms_per_req"],
            "harness_cpu_ms_per_req": _harness(r["cpu"]),
            "others_cores": r["cpu"]["others_cores"],
            "errors": r["errors_total"],
            "id_leaks": r["id_leaks"],
        }
        for r in rows
    ]


def _harness(cpu: dict[str, Any]) -> float | None:
    """CPU per request of the simulators and load generator together."""
    if cpu["sims_ms_per_req"] is None or cpu["loadgen_ms_per_req"] is None:
        return None
    return round(float(cpu["sims_ms_per_req"]) + float(cpu["loadgen_ms_per_req"]), 3)


def _cell(row: dict[str, Any]) -> str:
    stream = "stream" if row["stream"] else "non-stream"
    return f"{row['mode']} {stream} c={row['concurrency']}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _errors(row: dict[str, Any]) -> str:
    if not row["errors_total"]:
        return "0"
    detail = ", ".join(f"{k} {v}" for k, v in row["errors"].items())
    return f"**{row['errors_total']}** ⚠ ({detail})"


def _leaks(row: dict[str, Any]) -> str:
    if row["id_leaks"] is None:
        return "n/a"
    if row["id_leaks"] and row["id_leaks"] == row["ok"]:
        return f"{row['id_leaks']} (all)"
    return str(row["id_leaks"])


def _rate(row: dict[str, Any]) -> str:
    """req/s pooled over the rounds, with the rounds' range when there were several."""
    rounds = row["req_per_s_per_round"]
    if len(rounds) < 2:
        return f"{row['req_per_s']:.1f}"
    return f"{row['req_per_s']:.1f} ({min(rounds):.0f}-{max(rounds):.0f})"


def _cell_columns(r: dict[str, Any]) -> str:
    """The first four columns of both tables: target, mode, stream, c."""
    return f"| {r['target']} | {r['mode']} | {'yes' if r['stream'] else 'no'} | {r['concurrency']} "


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | mode | stream | c | req/s | p50 ms | p99 ms | TTFT p50 ms "
        "| +p50 over floor | CPU ms/req | errors | id leaks |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        added = r["added_p50_ms_over_floor"]
        ttft = r["ttft_ms"]["p50"] if r["ttft_ms"] else None
        lines.append(
            f"{_cell_columns(r)}| {_rate(r)} "
            f"| {_num(r['latency_ms']['p50'], '{:.2f}')} "
            f"| {_num(r['latency_ms']['p99'], '{:.2f}')} "
            f"| {'—' if ttft is None else f'{ttft:.2f}'} "
            f"| {'—' if added is None else f'{added:+.2f}'} "
            f"| {'—' if r['cpu']['target_ms_per_req'] is None else r['cpu']['target_ms_per_req']} "
            f"| {_errors(r)} | {_leaks(r)} |"
        )
    return lines


def cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | mode | stream | c | target | sims P / D | load gen | machine | others "
        "| harness ms/req (sims + load gen) | saturated |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cpu = r["cpu"]
        by_role = {"P": 0.0, "D": 0.0}
        for sim in cpu["sims"]:
            by_role[sim["sim"][0]] += sim["cores"]
        harness = _harness(cpu)
        lines.append(
            f"{_cell_columns(r)}| {_num(cpu['target_cores'], '{:.2f}')} "
            f"| {by_role['P']:.2f} / {by_role['D']:.2f} | {cpu['loadgen_cores']:.2f} "
            f"| {cpu['machine_busy_cores']:.2f} | {cpu['others_cores']:.2f} "
            f"| {_num(harness, '{:.2f}')} | {'; '.join(r['saturated']) or '—'} |"
        )
    return lines


def profile_section(profile: dict[str, Any]) -> list[str]:
    lines = [
        f"## Profile: moriio-proxy, {profile['cell']}",
        "",
        f"py-spy, {profile['seconds']} s, {profile['samples']} samples off-idle, during a "
        f"separate pass of this cell ({profile['req_per_s']} req/s while sampled; sampling "
        f"slows the proxy). Raw stacks: `{profile['raw']}`.",
        "",
        "| # | function (own time) | own % | total % |",
        "|---:|---|---:|---:|",
    ]
    for i, row in enumerate(profile["top_own"], 1):
        name = row["function"].replace("|", "\\|")
        lines.append(f"| {i} | `{name}` | {row['own_pct']} | {row['total_pct']} |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        "# Proxy overhead against simulated instances",
        "",
        f"{run['when']}; {run['machine']}; moriio-proxy {run['moriio_proxy']}; "
        f"vllm-router {run['vllm_router']}; Python {run['python']}.",
        "",
        f"Command: `{run['command']}`",
        "",
        f"Each cell: {run['settings']}. Targets in each cell run one after the other, "
        "so the rows of a cell are measured side by side. See bench/README.md for how to "
        "read this.",
        "",
    ]
    if report["skipped"] or report["warnings"]:
        lines += ["## Warnings", ""]
        lines += [f"- **SKIPPED** {s}" for s in report["skipped"]]
        lines += [f"- {w}" for w in report["warnings"]]
        lines.append("")
    lines += ["## Results", "", *results_table(report["results"]), ""]
    lines += [
        "## Where the CPU went",
        "",
        "Cores used during each measured window (1.00 = one core busy all the time); "
        "'others' is CPU used by processes this run did not start.",
        "",
        *cpu_table(report["results"]),
        "",
    ]
    if report.get("profile"):
        lines += profile_section(report["profile"])
    return "\n".join(lines)
