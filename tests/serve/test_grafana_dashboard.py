"""The shipped Grafana dashboard (surprise_monitor/serve/config/grafana/dashboard.json):
well-formed, every panel queries series the monitor exports (the e2e test evaluates each query in
a real Prometheus), template variables defined."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from surprise_monitor.monitor import MetricsOptions, SurpriseMonitor

ROOT = Path(__file__).resolve().parents[2]
BOARD = ROOT / "surprise_monitor" / "serve" / "config" / "grafana" / "dashboard.json"


def test_every_panel_queries_exported_series(calibrated):
    model, table = calibrated
    board = json.loads(BOARD.read_text())
    registry = CollectorRegistry()
    with SurpriseMonitor(model, table, metrics=MetricsOptions(registry, per_class=True)) as monitor:
        monitor(torch_inputs())
        exported = set(re.findall(r"^(surprise_monitor_\w+?)[{ ]",
                                  generate_latest(registry).decode(), re.M))  # fmt: skip
    titles = [p["title"] for p in board["panels"]]
    assert len(set(titles)) == len(titles) == 7
    assert len({p["id"] for p in board["panels"]}) == 7
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job"}
    used: set[str] = set()
    for panel in board["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'job=~"$job"' in expr, expr
            assert set(re.findall(r"\$(\w+)", expr)) <= variables | {"__rate_interval"}
            used |= set(re.findall(r"\b(surprise_monitor_\w+)", expr))
    assert used <= exported, used - exported
    for needed in (
        "inputs_alarmed_total",
        "p_value_bucket",
        "alarm_rate_nominal",
        "window_ks_distance",
        "added_latency_seconds_bucket",
        "failures_total",
    ):
        assert f"surprise_monitor_{needed}" in used, needed  # fmt: skip
    kinds = {p["type"] for p in board["panels"]}
    assert kinds == {"timeseries", "heatmap"}


def torch_inputs():
    from tests._models import mixed_inputs

    return mixed_inputs(6)
