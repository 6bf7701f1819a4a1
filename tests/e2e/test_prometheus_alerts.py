"""End to end: a real Prometheus scrapes the example service and raises the low-beta alert.

The rules are examples/alerts.yml with the same expressions and shorter windows (rate over 10s
instead of 5m, ``for: 3s`` instead of 5m), scraped and evaluated every second. Normal traffic
(the calibration images: 1% low beta) leaves the alert inactive; atypical traffic (near-blank
images) makes it pending, then firing. Needs the ``prometheus`` and ``promtool`` binaries
(Debian's ``prometheus`` package; ``.ci/run`` installs it). Bounded: about 40 s of traffic.
"""

from __future__ import annotations

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
from tests._models import class_images

ROOT = Path(__file__).resolve().parents[2]
ALERT = "SurpriseMonitorLowBetaRateHigh"
RATIO = "surprise_monitor:low_beta_inputs:ratio_rate5m"

pytestmark = pytest.mark.prometheus
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus / promtool binaries are missing (Debian package 'prometheus'; "
    ".ci/run installs it)",
)


def short_rules(text: str) -> str:
    """examples/alerts.yml with 10s rate windows and ``for: 3s``; expressions unchanged."""
    text, windows = re.subn(r"\[5m\]", "[10s]", text)
    text, holds = re.subn(r"for: 5m", "for: 3s", text)
    assert windows >= 4 and holds >= 3, "examples/alerts.yml changed shape; update this test"
    return text


@needs_prometheus
def test_promtool_checks_and_unit_tests_the_rules():
    for cmd in (
        ["promtool", "check", "rules", str(ROOT / "examples" / "alerts.yml")],
        ["promtool", "test", "rules", str(ROOT / "tests" / "e2e" / "alerts_test.yml")],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout


def test_rules_name_only_exported_metrics():
    """Every surprise_monitor_* series the rules read is one the monitor exports."""
    from prometheus_client import CollectorRegistry, generate_latest

    from calibrate import calibrate
    from monitor import SurpriseMonitor
    from tests._models import TinyCNN, class_dataset, seeded

    model = seeded(TinyCNN(num_classes=2))
    table = calibrate(model, class_dataset(40, 2), progress=False)
    registry = CollectorRegistry()
    with SurpriseMonitor(model, table, metrics=registry):
        exported = set(re.findall(r"^(surprise_monitor_\w+?)[{ ]", generate_latest(registry)
                                  .decode(), re.M))  # fmt: skip
    rules = (ROOT / "examples" / "alerts.yml").read_text()
    exprs = re.findall(r"expr: (.*?)\n\s*(?:for:|-|\n)", rules, re.S)  # expressions only
    used = set(re.findall(r"\b(surprise_monitor_\w+)", "\n".join(exprs)))
    assert len(exprs) == 7
    assert used and used <= exported, used - exported


class Traffic:
    """Posts batches to /predict from a background thread until stopped (bounded)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.inputs = class_images(600, 3, seed=1)[0]  # the calibration images
        self.atypical = False
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _batch(self, i: int) -> torch.Tensor:
        if self.atypical:
            g = torch.Generator().manual_seed(i)
            return 0.05 * torch.randn(8, 3, 8, 8, generator=g)
        start = (8 * i) % 600
        return self.inputs[start : start + 8]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(2000):  # 2000 x 0.05 s at most: bounded even if never stopped
                if self._stop.is_set():
                    return
                resp = client.post(self.url + "/predict", json={"inputs": self._batch(i).tolist()})
                if resp.status_code != 200:
                    self.errors.append(resp.text)
                self.sent += 1
                time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _alert_state(api: str) -> str:
    alerts = httpx.get(api + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    states = {a["state"] for a in alerts if a["labels"].get("alertname") == ALERT}
    return "firing" if "firing" in states else "pending" if "pending" in states else "inactive"


def _ratio(api: str) -> float | None:
    result = httpx.get(api + "/api/v1/query", params={"query": RATIO}, timeout=5).json()
    values = result["data"]["result"]
    return float(values[0]["value"][1]) if values else None


@needs_prometheus
def test_low_beta_alert_goes_pending_then_firing(saved_tiny_model, tmp_path):
    model, table, args = saved_tiny_model
    service, url = start_service(args, tmp_path / "serve.log")
    prometheus = None
    try:
        rules = tmp_path / "rules.yml"
        rules.write_text(short_rules((ROOT / "examples" / "alerts.yml").read_text()))
        check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        target = url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: model\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
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
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(api + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready in 30 s"
            time.sleep(0.3)

        with Traffic(url) as traffic:
            # Normal traffic: wait for 12 s of ratios (a full 10 s window), alert inactive.
            normal: list[float] = []
            deadline = time.monotonic() + 60
            first = None
            while first is None or time.monotonic() - first < 12:
                assert time.monotonic() < deadline, "no low-beta ratio from prometheus in 60 s"
                value = _ratio(api)
                if value is not None:
                    first = first or time.monotonic()
                    normal.append(value)
                    assert _alert_state(api) == "inactive", (value, normal)
                time.sleep(1)
            assert max(normal) < 0.05, normal

            # Atypical traffic: the alert must turn pending, then firing.
            traffic.atypical = True
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while "firing" not in seen:
                assert time.monotonic() < deadline, f"alert states seen: {seen}"
                seen.append(_alert_state(api))
                time.sleep(0.5)
            assert "pending" in seen and seen.index("pending") < seen.index("firing"), seen
            assert _ratio(api) > 0.05
        assert not traffic.errors, traffic.errors[:3]
        up = httpx.get(api + "/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        if prometheus is not None:
            stop_process(prometheus)
        stop_process(service)
