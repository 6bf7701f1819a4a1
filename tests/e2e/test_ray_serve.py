"""End to end on Ray Serve: two monitored replicas, one alarm log, a real Prometheus.

A local Ray cluster (this machine's CPUs) runs the application of
:func:`surprise_monitor.integrations.ray_serve.build_app`: two replicas of the monitored model
(a table with a conformal null of 2,000 held-out images, nominal alarm rate 1%) and the alarm log
(one replica with the JSONL audit file). A real Prometheus finds Ray's metrics endpoint through
the service-discovery file Ray writes and evaluates ``serve/config/alerts-ray.yml`` with shorter
windows (rates over 10s instead of 5m, ``for: 3s``; expressions unchanged). Traffic goes through
Serve's HTTP proxy from two client threads (so both replicas answer):

(a) normal traffic: the pooled alarm-rate alert stays inactive; midway the alarm log's replica
    is killed (Serve starts another, which reopens the audit file);
(b) 10% of the inputs are uniform noise: the alert goes pending, then firing;
(c) afterwards every alarm the clients saw is in the audit file exactly once (by request), ids
    unique and in order, the page lists alarms from both replicas, and the scraped counters,
    summed over the replicas, equal what the clients counted: inputs = monitored + skipped,
    alarmed and judged inputs, so the scraped pooled alarm rate is the clients' rate;
(d) every bad or hostile request of :mod:`bench.hostile_requests`, sent through Serve's proxy,
    gets the single service's status and message (the same limits and error codes), and a real
    PNG is answered.

It runs twice: behind Serve's default Python proxy, and behind HAProxy
(``RAY_SERVE_ENABLE_HA_PROXY=1``: each replica answers HTTP itself).

Needs Ray Serve (the ``ray`` extra) and the ``prometheus`` binaries; ``.ci/run`` installs both
and runs it as its own step (``-m ray``). Bounded: a few minutes; it stops what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from bench._serve_process import free_port, stop_process
from bench.hostile_requests import CASES, image_ready_table, real_png
from surprise_monitor.monitor.alarms import read_records
from surprise_monitor.monitor.table import CalibrationTable
from tests._models import heldout_dataset
from tests.e2e.test_prometheus_alerts import (
    _alert_state,
    _query,
    _wait_firing,
    short_rules,
    start_prometheus,
)

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "surprise_monitor" / "serve" / "config" / "alerts-ray.yml"
RATE_ALERT = "SurpriseMonitorAlarmRateHigh"
RATIO = "surprise_monitor:alarmed_inputs:ratio_rate5m"
SD_FILE = Path("/tmp/ray/session_latest/prom_metrics_service_discovery.json")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus / promtool binaries are missing (Debian package 'prometheus')",
)


class Clients:
    """Two threads posting batches of 10 to /predict through Serve's proxy, each request with
    its own X-Request-ID; the first ``noise`` inputs of each batch are uniform noise. Counts
    what the clients saw: inputs, judged inputs (with a p-value), alarms per request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.inputs = heldout_dataset(4000, start=6000).tensors[0]  # no part of calibration
        self.low, self.high = float(self.inputs.min()), float(self.inputs.max())
        self.noise = 0
        self.sent = self.judged = 0
        self.alarms: Counter[str] = Counter()  # request id -> inputs that alarmed
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                         for t in range(2)]  # fmt: skip

    def _batch(self, i: int) -> torch.Tensor:
        start = (10 * i) % (len(self.inputs) - 10)
        x = self.inputs[start : start + 10].clone()
        g = torch.Generator().manual_seed(i)
        x[: self.noise] = self.low + (self.high - self.low) * torch.rand(
            self.noise, *x.shape[1:], generator=g
        )
        return x

    def _run(self, t: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(5000):  # bounded even if never stopped
                if self._stop.is_set():
                    return
                rid = f"c{t}-{i}"
                body = {"inputs": self._batch(2 * i + t).tolist()}
                resp = client.post(self.url + "/predict", json=body,
                                   headers={"X-Request-ID": rid})  # fmt: skip
                with self._lock:
                    if resp.status_code != 200:
                        self.errors.append(resp.text[:300])
                        continue
                    answer = resp.json()
                    assert answer["request_id"] == rid
                    self.sent += len(answer["predictions"])
                    self.judged += sum(p is not None for p in answer["p_value"])
                    hits = sum(bool(a) for a in answer["alarm"])
                    if hits:
                        self.alarms[rid] += hits
                time.sleep(0.01)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def _start_prometheus(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping the targets of Ray's service-discovery file every second, with the
    Ray rules' short variant; its API's URL once ready."""
    targets = f"    file_sd_configs:\n      - files: ['{SD_FILE}']\n        refresh_interval: 5s\n"
    return start_prometheus(tmp_path, short_rules(RULES.read_text()), "ray", targets)


def _scraped(api: str, metric: str) -> float:
    """A counter summed over every series (0 when it has none yet)."""
    return _query(api, f"sum({metric})") or 0.0


def _kill_alarm_log() -> str:
    """Kill the alarm log's replica actor (Serve starts another); its actor name."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "#AlarmLog#" in a["name"]]  # fmt: skip
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def _wait(check, budget: float, what: str) -> None:
    deadline = time.monotonic() + budget
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


#: Serve's ingress: its Python HTTP proxy (the default), or HAProxy in front with each replica
#: answering HTTP itself (``RAY_SERVE_ENABLE_HA_PROXY=1``), which the README recommends for small
#: requests. (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` on top, gRPC between Serve's processes, failed
#: here: alarms sent after the alarm log's replica was killed had not reached the audit file
#: 60 s later; the README says so.)
INGRESS = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


@needs_prometheus
@pytest.mark.parametrize("ingress", sorted(INGRESS))
def test_two_replicas_one_alarm_log_pooled_alert(saved_tiny_model, tmp_path, monkeypatch, ingress):
    from surprise_monitor.integrations.ray_serve import build_app

    for name, value in INGRESS[ingress].items():
        monkeypatch.setenv(name, value)  # read by Ray's processes, started below

    _, table, args = saved_tiny_model
    audit = tmp_path / "alarms.jsonl"
    ready = image_ready_table(CalibrationTable.load(args[args.index("--table") + 1]))
    args = [*args[: args.index("--table")], "--table", str(ready.save(tmp_path / "t.safetensors"))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    SD_FILE.unlink(missing_ok=True)
    # a port of its own for each cluster's dashboard: the one before may still hold 8265
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
             _metrics_export_port=free_port(),
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False)  # fmt: skip
    prometheus = None
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app([*args, "--alarm-audit", str(audit)], num_replicas=2,
                        ray_actor_options={"num_cpus": 0.5})  # fmt: skip
        serve.run(app, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait(SD_FILE.exists, 30, "Ray wrote no service-discovery file")
        prometheus, api = _start_prometheus(tmp_path)
        with Clients(url) as clients:
            # (a) normal traffic, 20 s of full 10 s windows; the log's replica killed midway
            deadline, first, killed = time.monotonic() + 120, None, None
            while first is None or time.monotonic() - first < 30:
                assert time.monotonic() < deadline, "no pooled alarm ratio in 120 s"
                if _query(api, RATIO) is not None and first is None:
                    first = time.monotonic()
                if first is not None and time.monotonic() - first >= 10:
                    assert _alert_state(api, RATE_ALERT) == "inactive", _query(api, RATIO)
                if first is not None and killed is None and time.monotonic() - first >= 15:
                    killed = _kill_alarm_log()
                time.sleep(1)
            normal = (sum(clients.alarms.values()), clients.judged)
            # (b) 10% noise: the pooled alarm-rate alert goes pending, then firing
            clients.noise = 1
            _wait_firing(api, RATE_ALERT, 90, {RATE_ALERT: []})
            # once the 10 s window holds only noisy traffic the ratio is about 0.1 (it fires
            # earlier, on a window still part normal: the limit is about 0.02)
            _wait(lambda: (_query(api, RATIO) or 0.0) > 0.05, 30, "the ratio stayed below 0.05")
        assert not clients.errors, clients.errors[:3]
        assert killed is not None
        seen = sum(clients.alarms.values())

        # (c) every alarm the clients saw is in the audit file exactly once
        _wait(lambda: sum(1 for _ in read_records(audit)) >= seen, 60,
              "the audit file is missing alarms")  # fmt: skip
        time.sleep(2)
        records = list(read_records(audit))
        ids = [r["id"] for r in records]
        assert ids == sorted(set(ids)), "audit ids repeat or go backwards"
        assert len({r["key"] for r in records}) == len(records)
        assert Counter(r["request_id"] for r in records) == clients.alarms
        log = serve.get_deployment_handle("AlarmLog", app_name="default")
        status = log.status.remote().result(timeout_s=30)
        assert status["reloaded"] > 0, status  # the new replica put the file's records back
        page = httpx.get(url + "/alarms/alarms.json", timeout=30).json()
        replicas = {a["replica"] for a in page["alarms"]}
        assert len(replicas) == 2, replicas
        html = httpx.get(url + "/alarms/", timeout=30).text
        assert all(f"replica {r}" in html for r in replicas)

        # the scraped counters, summed over both replicas, are the clients' counts
        def settled() -> bool:
            return _scraped(api, "ray_surprise_monitor_inputs_total") == clients.sent

        _wait(settled, 60, "the scraped inputs never reached the clients' count")
        monitored = _scraped(api, "ray_surprise_monitor_inputs_monitored_total")
        skipped = _scraped(api, "ray_surprise_monitor_inputs_skipped_total")
        alarmed = _scraped(api, "ray_surprise_monitor_inputs_alarmed_total")
        judged = _scraped(api, "ray_surprise_monitor_p_value_count")
        assert monitored + skipped == clients.sent
        assert (alarmed, judged) == (seen, clients.judged)
        per_replica = httpx.get(
            api + "/api/v1/query",
            timeout=5,
            params={"query": "sum by (replica) (ray_surprise_monitor_inputs_total)"},
        ).json()
        assert len(per_replica["data"]["result"]) == 2, per_replica
        # (d) the single service's answers to bad and hostile requests, through Serve's proxy
        wrong = {}
        for case, (send, code, phrase) in CASES.items():
            resp = send(url)
            if resp.status_code != code or phrase not in resp.text:
                wrong[case] = (resp.status_code, resp.text[:200])
        assert not wrong, wrong
        png = httpx.post(url + "/predict/image?label=1", content=real_png(), timeout=30,
                         headers={"content-type": "image/png"})  # fmt: skip
        assert png.status_code == 200 and len(png.json()["predictions"]) == 1, png.text[:300]
        print(json.dumps({"normal": normal, "alarmed": seen, "judged": clients.judged,
                          "inputs": clients.sent, "killed": killed, "status": status}))  # fmt: skip
    finally:
        if prometheus is not None:
            stop_process(prometheus)
        serve.shutdown()
        ray.shutdown()
