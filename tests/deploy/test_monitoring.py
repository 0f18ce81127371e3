"""deploy/monitoring: the Prometheus alert rules and the Grafana dashboard name only metrics
the proxy exports, and are well formed. ``promtool`` (Debian's ``prometheus`` package; set
PROMTOOL to its path when it is not on PATH) checks the rules and runs the alert cases in
alerts_test.yaml; without it the expressions are checked by parsing here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from moriio_proxy.metrics import Metrics

from .util import DEPLOY

MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "prometheus-alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERT_CASES = Path(__file__).with_name("alerts_test.yaml")

# The phase histograms of issue 13 (time to first token and the phases of a request), which
# the dashboard and the alerts use.
PHASE_HISTOGRAMS = (
    "moriio_proxy_time_to_first_token_seconds",
    "moriio_proxy_request_duration_seconds",
    "moriio_proxy_prefill_duration_seconds",
    "moriio_proxy_decode_first_byte_seconds",
    "moriio_proxy_inter_chunk_seconds",
)
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "label_values", "clamp_min", "abs",
}  # fmt: skip
_METRIC = re.compile(r"\bmoriio_proxy_\w+")


def known_metrics() -> set[str]:
    """Every series name the proxy exports (counters with _total, histograms' parts)."""
    metrics = Metrics()
    metrics.watch(lambda: [])  # moriio_proxy_instances, computed at scrape time
    names: set[str] = set()
    histograms: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            histograms.add(family.name)
        else:
            names.add(family.name)
    for name in histograms:
        names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


KNOWN = known_metrics()


def test_the_phase_histograms_are_exported():
    assert {f"{name}_bucket" for name in PHASE_HISTOGRAMS} <= KNOWN


def plausible_promql(expr: str) -> list[str]:
    """What is wrong with ``expr`` as PromQL, as far as a reader without promtool can tell:
    unknown metrics, unbalanced brackets, unknown functions, malformed label matchers."""
    problems = [f"unknown metric {m}" for m in _METRIC.findall(expr) if m not in KNOWN]
    if not _METRIC.search(expr):
        problems.append("names no moriio_proxy metric")
    depth: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            depth.append(char)
        elif char in pairs and (not depth or depth.pop() != pairs[char]):
            problems.append(f"unbalanced {char!r}")
    if depth:
        problems.append(f"unclosed {''.join(depth)!r}")
    for name in re.findall(r"\b([a-z_]+)\s*\(", expr):
        if name not in FUNCTIONS:
            problems.append(f"unknown function {name}")
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            if not re.fullmatch(r'[a-z_]+\s*(=|!=|=~|!~)\s*"[^"]*"', matcher):
                problems.append(f"bad label matcher {matcher!r}")
    return problems


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_rules_cover_what_an_operator_must_be_woken_for():
    by_metric = {rule["alert"]: set(_METRIC.findall(rule["expr"])) for rule in rules()}
    wanted = {
        "moriio_proxy_instances",  # no P or no D
        "moriio_proxy_requests_total",  # error ratio
        "moriio_proxy_ejections_total",
        "moriio_proxy_decode_aborted_before_kv_total",
        "moriio_proxy_time_to_first_token_seconds_bucket",  # p99 TTFT
    }
    assert wanted <= set().union(*by_metric.values())


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_each_rule_is_well_formed(rule: dict[str, Any]):
    assert re.fullmatch(r"MoriioProxy[A-Za-z]+", rule["alert"])
    assert plausible_promql(rule["expr"]) == []
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    if "for" in rule:
        assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_the_checker_tells_good_promql_from_bad():
    assert plausible_promql('sum(rate(moriio_proxy_retries_total{job=~"$job"}[5m]))') == []
    assert plausible_promql("sum(rate(moriio_proxy_retries[5m]))") == [
        "unknown metric moriio_proxy_retries"
    ]
    assert plausible_promql("sum(rate(moriio_proxy_retries_total[5m])") == ["unclosed '('"]
    assert plausible_promql("sumx(moriio_proxy_retries_total)") == ["unknown function sumx"]
    assert plausible_promql("moriio_proxy_instances{role=P}") == ["bad label matcher 'role=P'"]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_parses_and_lays_out_its_panels():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job"}


@pytest.mark.parametrize("panel", dashboard_panels(), ids=lambda p: p["title"])
def test_every_panel_queries_known_metrics(panel: dict[str, Any]):
    assert panel["description"], "a panel says what it shows"
    assert panel["targets"]
    for target in panel["targets"]:
        assert plausible_promql(target["expr"]) == [], target["expr"]
        assert 'job=~"$job"' in target["expr"]


def test_the_alerts_the_dashboard_names_exist():
    alerts = {rule["alert"] for rule in rules()}
    named = {m for p in dashboard_panels() for m in re.findall(r"MoriioProxy\w+", p["description"])}
    assert named and named <= alerts


def promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(promtool() is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_each_alert_fires_when_it_should():
    tool = promtool()
    assert tool is not None
    checked = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    cases = subprocess.run(
        [tool, "test", "rules", ALERT_CASES.name],
        cwd=ALERT_CASES.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert cases.returncode == 0, cases.stdout + cases.stderr
