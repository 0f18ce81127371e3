"""The streams benchmark's markdown: verdicts against the targets, then the tables."""

from __future__ import annotations

from typing import Any

IDLE_TARGET_MB = 50.0  # per 1,000 idle streams
# Flat: the steady window's fitted RSS growth is under this share of the RSS (or 5 MB).
FLAT_SHARE = 0.02
FLAT_FLOOR_MB = 5.0
_TIMELINE_ROWS = 40


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _errors(errors: dict[str, int]) -> str:
    total = sum(errors.values())
    if not total:
        return "0"
    return f"**{total} ⚠** (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")"


def flat_allowance(rss_mb: float) -> float:
    return max(FLAT_FLOOR_MB, FLAT_SHARE * rss_mb)


def verdicts(report: dict[str, Any]) -> list[str]:
    """One line per target: PASS or FAIL and the figure that decides it."""
    out = []
    idle = report.get("idle")
    if idle:
        rounds = idle["rounds"]
        worst = max(r["mb_per_1000"] for r in rounds)
        errors = sum(sum(r["errors"].values()) for r in rounds)
        released = all(r["released"] for r in rounds)
        ok = worst < IDLE_TARGET_MB and not errors and released
        out.append(
            f"{'PASS' if ok else 'FAIL'}: 1,000 idle streams cost {worst:.1f} MB of proxy RSS "
            f"at most (target < {IDLE_TARGET_MB:g} MB); {errors} stream errors; "
            + (
                "every connection and D request released on close"
                if released
                else "connections or D requests NOT released after close"
            )
        )
    slow = report.get("slow")
    if slow:
        errors = sum(slow["errors"].values())
        steady = slow.get("steady")
        if steady is None:
            out.append(
                f"FAIL: {slow['streams']:,} slow streams were never all open at once "
                f"({errors} errors, {slow['unfinished']} unfinished)"
            )
        else:
            minutes = (steady["to_s"] - steady["from_s"]) / 60
            growth = (steady["rss_slope_mb_per_min"] or 0.0) * minutes
            allowance = flat_allowance(steady["rss_first_mb"])
            flat = abs(growth) <= allowance
            ok = flat and not errors and not slow["unfinished"]
            out.append(
                f"{'PASS' if ok else 'FAIL'}: {slow['streams']:,} concurrent slow streams, "
                f"{errors} errors, {slow['unfinished']} unfinished; "
                f"{steady['mb_per_1000']:.1f} MB of proxy RSS per 1,000 streaming; RSS over the "
                f"{minutes * 60:.0f} s all were open: fitted change {growth:+.1f} MB "
                f"({'flat' if flat else 'NOT flat'}: allowance {allowance:.1f} MB), "
                f"max-min {steady['rss_max_mb'] - steady['rss_min_mb']:.1f} MB"
            )
    return out


def idle_section(idle: dict[str, Any]) -> list[str]:
    rounds = idle["rounds"]
    first = rounds[0]
    warm = idle["warmup"]
    lines = [
        "## Idle streams",
        "",
        f"`moriio-proxy serve {' '.join(idle['proxy_args'])}`, one simulated P, "
        f"{idle['decodes']} simulated D (zero latency). Warm-up: {warm['requests']} ordinary "
        f"streams ({warm['max_tokens']} tokens, 50 at a time; errors: "
        f"{_errors(warm['errors'])}). Then the D's stall fault is set (after 1 token, "
        f"silent until the client leaves) and each round opens {first['streams']:,} streams "
        "over the ramp, waits for every first token, holds them, reads the proxy, then "
        "closes every client connection.",
        "",
        f"Baseline after the warm-up: RSS {idle['baseline']['rss_mb']:.1f} MB "
        f"(RssAnon {idle['baseline']['anon_mb']:.1f} MB). Other work on the machine used "
        f"{idle['others_before']:.2f} cores just before the phase.",
        "",
        "| round | streams | got first token | RSS before MB | RSS held MB | **MB per "
        "1,000 streams** | RssAnon +MB | RSS after close MB | client sockets | upstream "
        "D / P sockets | fds | D requests open | released in s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        held = max(r["held"], key=lambda m: m["rss_mb"])
        socks = r["sockets"]
        clients = sum(s["client_sockets"] for s in socks)
        d = sum(s["upstream_d_sockets"] for s in socks)
        p = sum(s["upstream_p_sockets"] for s in socks)
        fds = sum(s["fds"] for s in socks)
        released = f"{r['released_seconds']:.1f}" if r["released"] else "**not released ⚠**"
        lines.append(
            f"| {i} | {r['streams']:,} | {r['first_event']:,} | {r['before']['rss_mb']:.1f} "
            f"| {held['rss_mb']:.1f} | **{r['mb_per_1000']:.1f}** | {r['anon_delta_mb']:.1f} "
            f"| {r['after']['rss_mb']:.1f} | {clients:,} | {d:,} / {p:,} | {fds:,} "
            f"| {r['d_in_flight_held']:,} → {r['d_in_flight_after']:,} | {released} "
            f"| {_errors(r['errors'])} |"
        )
    lines.append("")
    for i, r in enumerate(rounds, 1):
        lines += _machine(r.get("machine"), f"round {i}'s open and hold")
    lines += _problems(idle, [s for r in rounds for s in r["error_samples"]])
    if idle.get("tracemalloc"):
        lines += _tracemalloc(idle["tracemalloc"])
    return lines


def _tracemalloc(trace: dict[str, Any]) -> list[str]:
    """Where a held stream's Python allocations are (a traced run)."""
    packages = ", ".join(f"{name} {size:,}" for name, size in trace["by_package"].items())
    lines = [
        "### Where a held stream's memory is (tracemalloc)",
        "",
        "This run's proxy ran under tracemalloc (`--tracemalloc`), which costs memory and "
        "time of its own: its RSS above is not a figure of record. Python allocations "
        f"alive while the streams were held, beyond the baseline: "
        f"**{trace['traced_bytes_per_stream']:,} bytes per stream**; still alive once all "
        f"were closed: {trace['traced_bytes_per_stream_after_close']:,} bytes per stream. "
        f"By the package that allocated (bytes per stream): {packages}.",
        "",
        "| allocated at | on behalf of the proxy's | bytes per stream | blocks per stream |",
        "|---|---|---|---|",
    ]
    for row in trace["top"]:
        lines.append(
            f"| `{row['site']}` | `{row['proxy_frame']}` | {row['bytes_per_stream']:,} "
            f"| {row['blocks_per_stream']:.2f} |"
        )
    return [*lines, ""]


def _machine(machine: dict[str, Any] | None, what: str) -> list[str]:
    """The TCP counters and the busiest processes this run did not start."""
    if not machine:
        return []
    tcp = ", ".join(f"{name} {value:+,}" for name, value in machine["tcp"].items())
    lines = [
        f"Around {what} ({machine['seconds']:.0f} s): TCP counters of the network namespace "
        f"(shared with other work on the machine): {tcp}.",
        "",
    ]
    if machine["others_top"]:
        lines += ["Busiest processes this run did not start:", ""]
        lines += [
            f"- {row['cores']:.2f} cores: pid {row['pid']} `{row['command']}`"
            for row in machine["others_top"]
        ]
        lines.append("")
    return lines


def _problems(phase: dict[str, Any], samples: list[str]) -> list[str]:
    lines = []
    log = phase["proxy_log_problems"]
    if log["count"]:
        lines += [f"The proxy logged {log['count']} warning/error line(s); the first:", ""]
        lines += [f"    {line}" for line in log["first"]] + [""]
    else:
        lines += ["The proxy logged no warning or error.", ""]
    if samples:
        lines += ["Failed streams (samples):", ""] + [f"- `{s}`" for s in samples[:8]] + [""]
    return lines


def slow_section(slow: dict[str, Any]) -> list[str]:
    steady = slow.get("steady")
    warm = slow["warmup"]
    lines = [
        "## Slow streams",
        "",
        f"`moriio-proxy serve {' '.join(slow['proxy_args'])}`, one simulated P (zero latency), "
        f"{slow['decodes']} simulated D (`{' '.join(slow['decode_args'])}`). Warm-up: "
        f"{warm['requests']} streams of {warm['max_tokens']} tokens (errors: "
        f"{_errors(warm['errors'])}); baseline RSS {slow['baseline']['rss_mb']:.1f} MB. Then "
        f"{slow['streams']:,} streams of {slow['max_tokens']} tokens, opened evenly over "
        f"{slow['ramp_seconds']:g} s, each on its own connection, run to their end; the "
        f"proxy sampled every {slow['sample_every']:g} s. Other work on the machine used "
        f"{slow['others_before']:.2f} cores just before the phase.",
        "",
        "| streams | errors | unfinished | tokens received / expected | first token after "
        "p50 / p99 / max s | gap between a stream's tokens p50 / p99 / max s | all streaming "
        "from-to s | RSS first / last / min / max MB | RSS slope MB/min | RSS after MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    window = "-"
    rss = "-"
    slope = "-"
    if steady:
        window = f"{steady['from_s']:.0f}-{steady['to_s']:.0f}"
        rss = " / ".join(
            f"{steady[k]:.1f}" for k in ("rss_first_mb", "rss_last_mb", "rss_min_mb", "rss_max_mb")
        )
        slope = _num(steady["rss_slope_mb_per_min"], "{:+.2f}")
    gaps = " / ".join(_num(slow[k], "{:.2f}") for k in ("gap_p50", "gap_p99", "gap_max"))
    first = slow.get("first_token") or {}
    ttft = " / ".join(_num(first.get(k), "{:.2f}") for k in ("p50", "p99", "max"))
    lines.append(
        f"| {slow['streams']:,} | {_errors(slow['errors'])} | {slow['unfinished']:,} "
        f"| {slow['tokens_received']:,} / {slow['tokens_expected']:,} | {ttft} | {gaps} "
        f"| {window} "
        f"| {rss} | {slope} | {slow['after']['rss_mb']:.1f} |"
    )
    lines.append("")
    if steady:
        c = steady["cores"]
        lines += [
            "CPU while all were open (cores; 1.00 = one core busy all the time; "
            f"{steady['events_per_s']:,.0f} token events/s reached the client):",
            "",
            "| proxy (all processes) | simulated D (all) | simulated P | load generator "
            "| machine | others |",
            "|---|---|---|---|---|---|",
            f"| {c['proxy']:.2f} | {c['D']:.2f} | {c['P']:.2f} | {c['loadgen']:.2f} "
            f"| {c['machine']:.2f} | {c['others']:.2f} |",
            "",
        ]
    lines += _waits(slow)
    lines += _timeline(slow["timeline"], slow["roles"])
    lines += _descriptors(slow.get("peak_sockets"), slow["roles"])
    lines += _machine(slow.get("machine"), "the streams")
    lines += _problems(slow, slow["error_samples"])
    return lines


def _waits(slow: dict[str, Any]) -> list[str]:
    """The proxy's own leg times and failures, and the longest accept queues seen."""
    lines = []
    metrics = slow.get("proxy_metrics") or {}
    if "unreadable" not in metrics and metrics:

        def quantile(name: str) -> str:
            h = metrics.get(name, {})
            return f"p50 {h.get('p50', '-')} s, p99 {h.get('p99', '-')} s ({h.get('count')} legs)"

        counters = ", ".join(f"`{k}` {v:g}" for k, v in metrics["counters"].items()) or "none"
        lines += [
            "The proxy's metrics over the streams: prefill leg "
            f"{quantile('moriio_proxy_prefill_duration_seconds')}; first byte to the client "
            f"{quantile('moriio_proxy_time_to_first_token_seconds')}; upstream failures, retries "
            f"and ejections: {counters}.",
            "",
        ]
    queues = slow.get("accept_queue_max") or {}
    if queues:
        worst = ", ".join(f"{name} {q:,} of {b:,}" for name, (q, b) in queues.items())
        lines += [
            "Longest accept queues seen at the samples (connections waiting for the "
            f"process to accept them, of its backlog): {worst}.",
            "",
        ]
    return lines


def _timeline(timeline: list[dict[str, Any]], roles: dict[str, str]) -> list[str]:
    if not timeline:
        return []
    pids = list(timeline[0]["rss_by_pid"])
    workers = [pid for pid in pids if roles.get(pid) in ("worker", "proxy")]
    head = " | ".join(f"{roles.get(pid, 'pid')} {pid} MB" for pid in pids)
    cpu_head = " | ".join(f"{roles.get(pid, 'pid')} {pid} cores" for pid in workers)
    step = -(-len(timeline) // _TIMELINE_ROWS)  # every sample, or every 2nd, 3rd...
    lines = [
        "Over time (t from the first stream's start; cores over the interval before t; "
        "'opened': connections the kernel completed, the proxy may not have accepted "
        f"them yet{'' if step == 1 else f'; every {step} samples, all in the JSON'}):",
        "",
        f"| t s | opened | open | got first token | tokens/s | proxy RSS MB | {head} "
        f"| proxy cores | {cpu_head} | D cores | machine | others |",
        "|---|---|---|---|---|---|" + "---|" * (len(pids) + len(workers)) + "---|---|---|---|",
    ]
    for row in timeline[step - 1 :: step]:
        per = " | ".join(_num(row["rss_by_pid"].get(pid)) for pid in pids)
        per_cpu = " | ".join(
            _num(row.get("cores_by_pid", {}).get(pid), "{:.2f}") for pid in workers
        )
        c = row["cores"]
        lines.append(
            f"| {row['t']:.0f} | {row['opened']:,} | {row['open_streams']:,} "
            f"| {row['first_events']:,} | {row['events_per_s']:,.0f} | {row['rss_mb']:.1f} "
            f"| {per} | {_num(c.get('proxy'), '{:.2f}')} | {per_cpu} "
            f"| {_num(c.get('D'), '{:.2f}')} | {_num(c.get('machine'), '{:.2f}')} "
            f"| {_num(c.get('others'), '{:.2f}')} |"
        )
    return [*lines, ""]


def _descriptors(peak: dict[str, Any] | None, roles: dict[str, str]) -> list[str]:
    if not peak:
        return ["Descriptors: no moment with every stream open was sampled.", ""]
    lines = [
        f"Descriptors with {peak['open_streams']:,} streams open:",
        "",
        "| process | fds | client sockets | upstream D sockets | upstream P sockets "
        "| other sockets |",
        "|---|---|---|---|---|---|",
    ]
    for s in peak["proxy"]:
        lines.append(
            f"| {roles.get(str(s['pid']), 'pid')} {s['pid']} | {s['fds']:,} "
            f"| {s['client_sockets']:,} | {s['upstream_d_sockets']:,} "
            f"| {s['upstream_p_sockets']:,} | {s['other_sockets']:,} |"
        )
    for url, s in peak["decodes"].items():
        lines.append(
            f"| simulated D {url} | {s['fds']:,} | {s['client_sockets']:,} (from the proxy) "
            "| - | - | " + f"{s['other_sockets']:,} |"
        )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        "# Long-lived streams through the proxy",
        "",
        f"{run['when']}; {run['machine']} ({run['load_at_end']} at the end); moriio-proxy "
        f"{run['moriio_proxy']}; Python {run['python']}; {run['mode']} mode; descriptor "
        f"limit {run['fd_limit']:,} per process. Memory in MB of 10^6 bytes: VmRSS summed "
        "over the proxy's processes (RssAnon: their private heap). See bench/README.md.",
        "",
        f"Command: `{run['command']}`",
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in report["verdicts"]],
        "",
    ]
    if report.get("idle"):
        lines += idle_section(report["idle"])
    if report.get("slow"):
        lines += slow_section(report["slow"])
    return "\n".join(lines)
