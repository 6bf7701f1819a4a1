"""End to end: a real Prometheus scrapes the example service and raises the alarm's alerts.

The rules are the shipped alerts.yml with the same expressions and shorter windows (rates over
10s instead of 5m, ``for: 3s`` instead of minutes), scraped and evaluated every second. The
service serves a table with a conformal null of 2,000 held-out images (nominal alarm rate 1%).
(a) Normal traffic (new images of the training distribution, exchangeable with the null):
both alerts stay inactive and the measured alarm rate is within its binomial interval of 1%.
(b) 10% of the inputs are uniform noise: the alarm-rate alert turns pending, then firing.
(c) A sustained shift (30% noise): the drift alert (KS distance of the window's p-values from
uniform over its critical value) turns pending, then firing. (d) Every query of every panel of
the shipped grafana/dashboard.json (template variables substituted) returns data. Needs the
``prometheus`` and ``promtool`` binaries (Debian's ``prometheus`` package; ``.ci/run``
installs it). Bounded: about a minute of traffic, loopback only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from bench._serve_process import free_port, start_service, stop_process
from tests._models import heldout_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "surprise_monitor" / "serve" / "config"  # surprise-serve --write-config's files
RULES = CONFIG / "alerts.yml"
RATE_ALERT = "SurpriseMonitorAlarmRateHigh"
DRIFT_ALERT = "SurpriseMonitorPValueDrift"
RATIO = "surprise_monitor:alarmed_inputs:ratio_rate5m"

pytestmark = pytest.mark.prometheus
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus / promtool binaries are missing (Debian package 'prometheus'; "
    ".ci/run installs it)",
)


def short_rules(text: str) -> str:
    """The shipped alerts.yml with 10s rate windows and ``for: 3s``; expressions unchanged."""
    text, windows = re.subn(r"\[5m\]", "[10s]", text)
    text, holds = re.subn(r"for: \d+m", "for: 3s", text)
    assert windows >= 7 and holds >= 4, "the shipped alerts.yml changed shape; update this test"
    return text


@needs_prometheus
def test_promtool_checks_and_unit_tests_the_rules():
    for cmd in (
        ["promtool", "check", "rules", str(RULES)],
        ["promtool", "test", "rules", str(ROOT / "tests" / "e2e" / "alerts_test.yml")],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout


def test_rules_name_only_exported_metrics():
    """Every surprise_monitor_* series the rules read is one the monitor exports."""
    from prometheus_client import CollectorRegistry, generate_latest

    from surprise_monitor.calibrate import calibrate
    from surprise_monitor.monitor import SurpriseMonitor
    from tests._models import TinyCNN, class_dataset, seeded

    model = seeded(TinyCNN(num_classes=2))
    table = calibrate(model, class_dataset(40, 2), progress=False)
    registry = CollectorRegistry()
    with SurpriseMonitor(model, table, metrics=registry):
        exported = set(re.findall(r"^(surprise_monitor_\w+?)[{ ]", generate_latest(registry)
                                  .decode(), re.M))  # fmt: skip
    rules = RULES.read_text()
    exprs = re.findall(r"expr: (.*?)\n\s*(?:for:|-|\n)", rules, re.S)  # expressions only
    used = set(re.findall(r"\b(surprise_monitor_\w+)", "\n".join(exprs)))
    assert len(exprs) == 13
    assert {
        "surprise_monitor_inputs_alarmed_total", "surprise_monitor_p_value_count",
        "surprise_monitor_window_ks_distance", "surprise_monitor_null_size",
    } <= used  # fmt: skip
    assert used <= exported, used - exported


class Traffic:
    """Posts batches of 10 to /predict from a background thread until stopped (bounded): new
    images of the training distribution, the first ``noise`` tenths of each batch replaced by
    uniform noise over the images' range."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.inputs = heldout_dataset(4000, start=6000).tensors[0]  # no part of calibration
        self.low, self.high = float(self.inputs.min()), float(self.inputs.max())
        self.noise = 0  # inputs of each batch of 10 that are noise
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _batch(self, i: int) -> torch.Tensor:
        start = (10 * i) % len(self.inputs)
        x = self.inputs[start : start + 10].clone()
        g = torch.Generator().manual_seed(i)
        x[: self.noise] = self.low + (self.high - self.low) * torch.rand(
            self.noise, *x.shape[1:], generator=g
        )
        return x

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(3000):  # 3000 x 0.04 s at most: bounded even if never stopped
                if self._stop.is_set():
                    return
                resp = client.post(self.url + "/predict", json={"inputs": self._batch(i).tolist()})
                if resp.status_code != 200:
                    self.errors.append(resp.text)
                self.sent += 1
                time.sleep(0.04)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _alert_state(api: str, name: str) -> str:
    alerts = httpx.get(api + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    states = {a["state"] for a in alerts if a["labels"].get("alertname") == name}
    return "firing" if "firing" in states else "pending" if "pending" in states else "inactive"


def _query(api: str, query: str) -> float | None:
    result = httpx.get(api + "/api/v1/query", params={"query": query}, timeout=5).json()
    values = result["data"]["result"]
    return float(values[0]["value"][1]) if values else None


def _start_prometheus(url: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping ``url`` every second with the short rules; its API's URL once
    ready."""
    target = f"    static_configs:\n      - targets: ['{url.removeprefix('http://')}']\n"
    return start_prometheus(tmp_path, short_rules(RULES.read_text()), "model", target)


def start_prometheus(
    tmp_path: Path, rules_text: str, job: str, targets: str
) -> tuple[subprocess.Popen, str]:
    """Prometheus with the rules ``rules_text`` (checked by promtool first), scraping job
    ``job`` at ``targets`` (its YAML lines: static or file service discovery) and evaluating
    every second; its API's URL once ready. Bounded: 30 s to get ready."""
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_text)
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        f"scrape_configs:\n  - job_name: {job}\n{targets}"
    )
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(tmp_path / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        if prometheus.poll() is not None:
            raise AssertionError((tmp_path / "prometheus.log").read_text()[-3000:])
        try:
            if httpx.get(api + "/-/ready", timeout=2).status_code == 200:
                return prometheus, api
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_process(prometheus)
            raise AssertionError("prometheus did not get ready in 30 s")
        time.sleep(0.3)


def _wait_firing(api: str, name: str, budget: float, seen: dict[str, list[str]]) -> None:
    """Poll every alert in ``seen`` every 0.5 s, appending its state, until ``name`` fires
    (fails after ``budget`` s); then ``name`` must have been pending before firing."""
    deadline = time.monotonic() + budget
    while "firing" not in seen[name]:
        assert time.monotonic() < deadline, f"{name}: states seen: {seen[name]}"
        for alert, states in seen.items():
            states.append(_alert_state(api, alert))
        time.sleep(0.5)
    states = seen[name]
    assert "pending" in states and states.index("pending") < states.index("firing"), states


def _totals(url: str) -> tuple[float, float]:
    """The service's alarmed (summed over classes) and p-valued input counts now."""
    text = httpx.get(url + "/metrics", timeout=10).text
    alarmed = re.findall(r"^surprise_monitor_inputs_alarmed_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    judged = re.search(r"^surprise_monitor_p_value_count (\S+)$", text, re.M)
    assert judged, text[-2000:]
    return sum(float(v) for v in alarmed), float(judged.group(1))


def dashboard_queries(rate_interval: str, job: str) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of the shipped grafana/dashboard.json, with the
    template variables substituted."""
    board = json.loads((CONFIG / "grafana" / "dashboard.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            out.append((panel["title"], expr.replace("$job", job)))
    return out


def _check_dashboard(api: str) -> None:
    """Every panel's every query returns data from the real Prometheus (the heatmap: several
    buckets)."""
    for title, expr in dashboard_queries("10s", "model"):
        answer = httpx.get(api + "/api/v1/query", params={"query": expr}, timeout=5).json()
        assert answer["status"] == "success", (title, expr, answer)
        result = answer["data"]["result"]
        assert result, f"panel {title!r}: no data for {expr}"
        if "p_value_bucket" in expr:
            assert len({r["metric"]["le"] for r in result}) == 17, result  # 16 bounds + Inf


@needs_prometheus
def test_alarm_alerts_quiet_at_nominal_fire_on_noise_and_drift(saved_tiny_model, tmp_path):
    _, table, args = saved_tiny_model
    assert table.alarm is not None and table.alarm.null_predicted.size == 2000
    service, url = start_service([*args, "--per-class-metrics"], tmp_path / "serve.log")
    prometheus = None
    try:
        prometheus, api = _start_prometheus(url, tmp_path)
        with Traffic(url) as traffic:
            # (a) normal traffic: once the 10 s rate window is full (the first ratios come from
            # two or three scrapes, extrapolated over the window), 15 s of ratios with both
            # alerts inactive
            ratios: list[float] = []
            deadline, first = time.monotonic() + 75, None
            start_counts = None
            while first is None or time.monotonic() - first < 25:
                assert time.monotonic() < deadline, "no alarm ratio from prometheus in 75 s"
                value = _query(api, RATIO)
                if value is not None:
                    if first is None:
                        first, start_counts = time.monotonic(), _totals(url)
                    if time.monotonic() - first >= 10:  # a full window
                        ratios.append(value)
                        for name in (RATE_ALERT, DRIFT_ALERT):
                            assert _alert_state(api, name) == "inactive", (name, ratios)
                time.sleep(1)
            alarmed, judged = (b - a for a, b in zip(start_counts, _totals(url), strict=True))
            rate, n = alarmed / judged, 2000
            margin = 3 * math.sqrt(0.01 * 0.99 * (1 / judged + 1 / n))
            assert judged >= 300 and abs(rate - 0.01) <= margin, (alarmed, judged, ratios)

            # (b) 10% of the inputs are noise: the alarm-rate alert goes pending, then firing
            traffic.noise = 1
            seen: dict[str, list[str]] = {RATE_ALERT: [], DRIFT_ALERT: []}
            _wait_firing(api, RATE_ALERT, 60, seen)
            assert _query(api, RATIO) > 0.05

            # (c) a sustained shift: the drift alert goes pending, then firing (it may have
            # started on the 10% already: D is then about 0.1, over its critical value 0.076)
            traffic.noise = 3
            _wait_firing(api, DRIFT_ALERT, 90, seen)
            ks = _query(api, "surprise_monitor_window_ks_distance")
            m = _query(api, "surprise_monitor_window_size")
            assert m >= 100 and ks > 1.95 * math.sqrt(1 / m + 1 / n), (ks, m)
            _check_dashboard(api)  # (d) every Grafana panel's query returns data
            print(f"normal: {alarmed:.0f}/{judged:.0f} alarmed; drift: D={ks:.3f}, m={m:.0f}")
        assert not traffic.errors, traffic.errors[:3]
        up = httpx.get(api + "/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        if prometheus is not None:
            stop_process(prometheus)
        stop_process(service)
