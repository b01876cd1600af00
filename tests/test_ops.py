"""The Grafana dashboard and the Prometheus alert rules in ops/ stay true to the code.

Every metric a dashboard panel or an alert rule queries must be one the code exports
(a name of the default registry once the runtime's, the stages' and the client's
metrics are imported, with the suffixes Prometheus gives counters and histograms),
so a renamed metric breaks this test instead of a dashboard. The dashboard covers
what an operator needs (throughput, latency percentiles, lag, pending, dead letters,
pool use, breaker state); the rules cover lag, dead-letter growth, pool exhausted,
stalled ticks and the write-behind behind. `promtool check rules` validates the rules
file where promtool is installed (.ci/run installs it; skipped here otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import pipeline.metrics
import stages.metrics
import stages.tools.client

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"
ALERTS = ROOT / "ops" / "alerts.yml"
METRIC = re.compile(r"\b(?:devsched|scheduler)_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                              "_created"), "gauge": ("",)}

assert pipeline.metrics and stages.metrics and stages.tools.client  # their metrics registered


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_rules() -> dict[str, str]:
    """alert name -> its expr (the rules file keeps each on one line)."""
    text = ALERTS.read_text()
    names = re.findall(r"^\s*- alert: (\S+)$", text, re.MULTILINE)
    exprs = re.findall(r"^\s*expr: (.+)$", text, re.MULTILINE)
    assert len(names) == len(exprs)
    return dict(zip(names, exprs, strict=True))


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    queried = {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert queried and queried <= exported_names(), queried - exported_names()


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needed in ("devsched_stage_handled_total", "histogram_quantile(0.99",
                   "devsched_client_allocate_seconds_bucket",
                   "devsched_stage_queue_wait_seconds_bucket", "devsched_stage_lag",
                   "devsched_stage_pending", "devsched_stage_dead_lettered_total",
                   "devsched_pool_devices", "devsched_breaker_state",
                   "devsched_stage_behind_seconds"):
        assert needed in exprs, needed


def test_every_metric_the_alert_rules_query_is_exported() -> None:
    rules = alert_rules()
    assert set(rules) == {"DevschedGroupLagging", "DevschedDeadLettersGrowing",
                          "DevschedPoolExhausted", "DevschedTicksStalled",
                          "DevschedWriteBehindBehind", "DevschedBreakerOpen"}
    queried = {m for expr in rules.values() for m in METRIC.findall(expr)}
    assert queried <= exported_names(), queried - exported_names()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
