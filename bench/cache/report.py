"""The prefix-cache benchmark's results: the table, the issue's targets checked, the files."""

from __future__ import annotations

from typing import Any

from .measure import RouterResult

# The targets of the cache-aware routing issue, for a moriio-proxy policy on this workload.
HIT_RATE_OVER_ROUND_ROBIN = 2.0
MAX_LOAD_OVER_MEAN = 1.5


def check_targets(results: list[RouterResult]) -> dict[str, dict[str, Any]]:
    """For each moriio-proxy policy: the issue's targets, each met or not, with the figures.

    * prefix-cache hit rate at least 2x round robin's and at least vllm-router's
      ``cache_aware``'s (when it ran);
    * no prefill instance above 1.5x the mean load (prefill legs);
    * p99 TTFT below round robin's.
    """
    by_name = {r.name: r for r in results}
    rr = by_name.get("round_robin")
    router = next((r for r in results if r.router == "vllm-router"), None)
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.router != "moriio-proxy" or r is rr or rr is None:
            continue
        checks: dict[str, Any] = {
            "hit_rate_2x_round_robin": r.hit_rate >= HIT_RATE_OVER_ROUND_ROBIN * rr.hit_rate,
            "load_within_1.5x_mean": r.leg_spread <= MAX_LOAD_OVER_MEAN,
            "p99_ttft_below_round_robin": r.ttft_p99_ms < rr.ttft_p99_ms,
            "no_errors": not r.errors,
        }
        if router is not None:
            checks["hit_rate_at_least_vllm_router"] = r.hit_rate >= router.hit_rate
        checks["all"] = all(checks.values())
        out[r.name] = checks
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _errors(r: RouterResult) -> str:
    total = sum(r.errors.values())
    if not total:
        return "0"
    detail = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))
    return f"**{total} ⚠** ({detail})"


def table(results: list[RouterResult]) -> list[str]:
    lines = [
        "| router | prefill policy | P hit rate | TTFT mean ms | TTFT p50 ms | TTFT p99 ms "
        "| load spread (legs) | work spread (tokens) | legs per P | req/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.router} | {r.policy} | {_pct(r.hit_rate)} | {r.ttft_mean_ms:.0f} "
            f"| {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | {r.leg_spread:.2f} "
            f"| {r.work_spread:.2f} | {' / '.join(str(n) for n in r.legs_per_p)} "
            f"| {r.req_per_s:.1f} | {_errors(r)} |"
        )
    return lines


def markdown(report: dict[str, Any], results: list[RouterResult]) -> str:
    run = report["run"]
    lines = [
        "# Prefix-cache routing on simulated prefills",
        "",
        f"{run['when']}; {run['machine']}; moriio-proxy at {run['moriio_proxy']}; "
        f"vllm-router {run['vllm_router']}; Python {run['python']}.",
        "",
        f"Command: `{run['command']}`",
        "",
        f"Workload: {run['workload']}",
        "",
        f"Fleet, the same for every router and fresh for each: {run['fleet']}",
        "",
        "See bench/README.md for how to read this.",
        "",
        "## Results",
        "",
        *table(results),
        "",
    ]
    checks = report["targets_met"]
    if checks:
        lines += ["## The issue's targets", ""]
        names = sorted({k for c in checks.values() for k in c if k != "all"})
        lines.append("| policy | " + " | ".join(names) + " | all |")
        lines.append("|---|" + "---|" * (len(names) + 1))
        for policy, c in checks.items():
            cells = ["yes" if c.get(n) else "**no**" for n in names]
            lines.append(
                f"| {policy} | " + " | ".join(cells) + f" | {'yes' if c['all'] else '**no**'} |"
            )
        lines.append("")
    counters = [(r, line) for r in results for line in r.router_metrics if "prefix" in line]
    if counters:
        lines += [
            "## What vllm-router says it did",
            "",
            "Its own Prometheus counters of prefix-routing decisions at the end of its run:",
            "",
            *(f"- `{line}`" for _, line in counters),
            "",
        ]
    for title, key in (("Skipped", "skipped"), ("Warnings", "warnings")):
        if report[key]:
            lines += [f"## {title}", "", *(f"- {x}" for x in report[key]), ""]
    return "\n".join(lines)
