"""Prometheus metrics: names and types, values against the reports, registries, labels, serving."""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from surprise_monitor.monitor import MetricsConflictError, MonitorMetrics, SurpriseMonitor
from surprise_monitor.monitor.options import MetricsOptions, Thresholds
from surprise_monitor.monitor.runtime.metrics import FAILURE_KINDS, beta_buckets_from, count_buckets
from tests._checks import run_in_threads
from tests._models import heldout_dataset, mixed_inputs

ROOT = Path(__file__).resolve().parents[3]
NAMES = {
    "surprise_monitor_inputs": "counter",
    "surprise_monitor_inputs_monitored": "counter",
    "surprise_monitor_inputs_flagged": "counter",
    "surprise_monitor_inputs_skipped": "counter",
    "surprise_monitor_failures": "counter",
    "surprise_monitor_beta": "histogram",
    "surprise_monitor_beta_percentile_ratio": "histogram",
    "surprise_monitor_filters_judged": "counter",
    "surprise_monitor_surprising_filters": "histogram",
    "surprise_monitor_expected_filters": "histogram",
    "surprise_monitor_added_latency_seconds": "histogram",
    "surprise_monitor_inspect_duration_seconds": "histogram",
    "surprise_monitor_queue_depth": "gauge",
    "surprise_monitor_table_info": "gauge",  # an info metric: a gauge of 1 in the text format
    "surprise_monitor_inputs_alarmed": "counter",
    "surprise_monitor_p_value": "histogram",
    "surprise_monitor_alarm_rate_nominal": "gauge",
    "surprise_monitor_null_size": "gauge",
    "surprise_monitor_window_size": "gauge",
    "surprise_monitor_window_alarm_rate": "gauge",
    "surprise_monitor_window_ks_distance": "gauge",
}


def _families(registry: CollectorRegistry) -> dict:
    """Metric families by name, without prometheus_client's ``*_created`` gauges."""
    text = generate_latest(registry).decode()
    fams = text_string_to_metric_families(text)
    return {f.name: f for f in fams if not f.name.endswith("_created")}


def _value(registry, name, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def test_names_types_and_values_follow_the_report(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    x = mixed_inputs()
    with SurpriseMonitor(model, table, metrics=registry) as monitor:
        monitor(x[:5])
        monitor(x[5:])
        report = monitor.inspect(x)  # inspect() itself does not count
        fams = _families(registry)
        assert {n: f.type for n, f in fams.items()} == NAMES
        for name, fam in fams.items():  # base units, no per-class label by default
            if fam.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)
            assert all("class" not in s.labels for s in fam.samples), name
        assert _value(registry, "surprise_monitor_inputs_total") == 12
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 12
        flags = {
            "surprise": report.surprise.any(1),
            "expectation": report.expectation.any(1),
            "low_beta": report.low_beta,
        }
        for kind, f in flags.items():
            assert _value(registry, "surprise_monitor_inputs_flagged_total", kind=kind) == int(
                f.sum()
            )
        assert int(flags["low_beta"].sum()) >= 3 and int(flags["surprise"].sum()) >= 3
        for reason in ("sampled_out", "queue_full", "failed", "model_error"):
            assert _value(registry, "surprise_monitor_inputs_skipped_total", reason=reason) == 0
        for name, counts in (
            ("surprise_monitor_surprising_filters", report.surprise_count),
            ("surprise_monitor_expected_filters", report.expectation_count),
        ):
            assert _value(registry, name + "_sum") == int(counts.sum())
            for bound in count_buckets(table.num_filters):
                assert _value(registry, name + "_bucket", le=str(bound)) == int(
                    (counts <= bound).sum()
                )
        for bound in monitor.metrics.beta_buckets:
            got = _value(registry, "surprise_monitor_beta_bucket", le=str(bound))
            assert got == int((report.beta <= bound).sum())
        ratio = report.beta_percentile.double() / 100.0  # a 0..1 ratio, as Prometheus wants
        assert _value(registry, "surprise_monitor_beta_percentile_ratio_sum") == pytest.approx(
            float(ratio.sum()), rel=1e-6
        )
        assert 0.0 <= float(ratio.min()) and float(ratio.max()) <= 1.0
        assert _value(registry, "surprise_monitor_beta_percentile_ratio_bucket", le="1.0") == 12
        for bound in (0.01, 0.5):
            assert _value(
                registry, "surprise_monitor_beta_percentile_ratio_bucket", le=str(bound)
            ) == int((ratio <= bound).sum())
        assert _value(registry, "surprise_monitor_added_latency_seconds_count") == 2
        assert _value(registry, "surprise_monitor_inspect_duration_seconds_count") == 2
        judged = _value(registry, "surprise_monitor_filters_judged_total")
        assert judged == 12 * table.num_filters
        info = {
            "layer": table.layer, "filters": str(table.num_filters),
            "table_fingerprint": table.fingerprint(), "created": table.created,
        }  # fmt: skip
        assert _value(registry, "surprise_monitor_table_info", **info) == 1.0
        assert len(table.fingerprint()) == 64
        latency = _value(registry, "surprise_monitor_added_latency_seconds_sum")
        assert 0 < latency < _value(registry, "surprise_monitor_inspect_duration_seconds_sum")


def test_beta_buckets_come_from_the_calibration_betas(calibrated):
    _, table = calibrated
    buckets = beta_buckets_from(table)
    assert list(buckets) == sorted(set(buckets)) and len(buckets) >= 5
    median_of_medians = float(table.beta_value_at(50.0).median())
    assert buckets[0] < median_of_medians < buckets[-1]
    assert count_buckets(16) == (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
    assert count_buckets(2048)[-1] == 2048.0


def test_per_class_labels_only_when_asked(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    x = mixed_inputs()
    options = MetricsOptions(registry=registry, per_class=True)
    with SurpriseMonitor(model, table, metrics=options) as monitor:
        report = monitor.run(x).report
        for c, name in enumerate(table.class_names):
            rows = report.classes == c
            got = _value(registry, "surprise_monitor_inputs_monitored_total", **{"class": name})
            assert (got or 0) == int(rows.sum())
            low = _value(
                registry, "surprise_monitor_inputs_flagged_total", kind="low_beta",
                **{"class": name},
            )  # fmt: skip
            assert (low or 0) == int((report.low_beta & rows).sum())
        fams = _families(registry).values()
        labelled = [s for f in fams for s in f.samples if "class" in s.labels]
        assert {s.name.rsplit("_", 1)[0] for s in labelled} == {
            "surprise_monitor_inputs_monitored", "surprise_monitor_inputs_flagged",
            "surprise_monitor_inputs_alarmed",
        }  # fmt: skip
        for c, name in enumerate(table.class_names):
            rows = report.classes == c
            got = _value(registry, "surprise_monitor_inputs_alarmed_total", **{"class": name})
            assert (got or 0) == int((report.alarm & rows).sum())
        assert int(report.alarm.sum()) > 0


def test_two_monitors_in_one_registry(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    with SurpriseMonitor(model, table, metrics=registry):
        with pytest.raises(MetricsConflictError, match="already registered.*distinct labels"):
            SurpriseMonitor(model, table, metrics=registry)
        with pytest.raises(MetricsConflictError, match="constant labels"):
            SurpriseMonitor(model, table, metrics=MetricsOptions(registry, labels={"model": "b"}))
        with SurpriseMonitor(model, table, metrics=MetricsOptions(registry, "shadow")) as other:
            other(mixed_inputs(2))
            assert _value(registry, "shadow_inputs_total") == 2
            assert _value(registry, "surprise_monitor_inputs_total") == 0
    assert all(not m._forward_hooks for m in model.modules())  # failed constructions cleaned up
    assert _families(registry) == {}  # the last monitor took its families along

    a = SurpriseMonitor(model, table, metrics=MetricsOptions(registry, labels={"model": "a"}))
    b = SurpriseMonitor(model, table, metrics=MetricsOptions(registry, labels={"model": "b"}))
    try:
        a(mixed_inputs(3))
        b(mixed_inputs(5))
        assert _value(registry, "surprise_monitor_inputs_total", model="a") == 3
        assert _value(registry, "surprise_monitor_inputs_total", model="b") == 5
        a.close()
        assert _value(registry, "surprise_monitor_inputs_total", model="a") is None
        assert _value(registry, "surprise_monitor_inputs_total", model="b") == 5
    finally:
        a.close()
        b.close()
    assert _families(registry) == {}


def test_shared_family_exposition(calibrated):
    """The text a scrape sees (what a rewrite of the registration must keep): one HELP/TYPE
    block per family for two monitors sharing a namespace, series in creation order, a beta
    histogram with a negative bucket that has ``_count`` but no ``_sum``, and a closed
    monitor's series gone."""
    model, table = calibrated
    with SurpriseMonitor(model, table) as monitor:
        reports = {"a": monitor.inspect(mixed_inputs()), "b": monitor.inspect(mixed_inputs(4, 3))}
    registry = CollectorRegistry()
    options = MetricsOptions(registry=registry, labels={"model": "a"}, beta_buckets=(-1, 0, 1))
    a = MonitorMetrics(table, options, alarm_rate=0.05)
    b = MonitorMetrics(table, replace(options, labels={"model": "b"}), alarm_rate=0.05)
    try:
        a.observe(reports["a"])
        b.observe(reports["b"])
        text = generate_latest(registry).decode()
        types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
        types = [t for t in types if not t.endswith("_created")]
        assert len(types) == len(set(types)) == len(NAMES)
        assert {n: f.type for n, f in _families(registry).items()} == NAMES
        for model_label, n in (("a", 12), ("b", 4)):
            labels, beta = {"model": model_label}, reports[model_label].beta
            assert _value(registry, "surprise_monitor_beta_count", **labels) == n == len(beta)
            assert _value(registry, "surprise_monitor_beta_sum", **labels) is None
            zero = _value(registry, "surprise_monitor_beta_bucket", le="0.0", **labels)
            assert zero == int((beta <= 0).sum())
        rows = [ln for ln in text.splitlines() if ln.startswith("surprise_monitor_inputs_total")]
        assert rows == [
            'surprise_monitor_inputs_total{model="a"} 0.0',
            'surprise_monitor_inputs_total{model="b"} 0.0',
        ]
        a.close()
        text = generate_latest(registry).decode()
        assert 'model="a"' not in text and 'model="b"' in text
    finally:
        a.close()
        b.close()
    assert _families(registry) == {}


def test_a_foreign_metric_with_the_same_name_is_a_clear_error(calibrated):
    _, table = calibrated
    registry = CollectorRegistry()
    prometheus_client.Counter("surprise_monitor_inputs", "someone else's", registry=registry)
    with pytest.raises(MetricsConflictError, match="other than a surprise monitor"):
        MonitorMetrics(table, MetricsOptions(registry=registry), alarm_rate=0.01)
    assert set(_families(registry)) == {"surprise_monitor_inputs"}  # nothing half-registered
    with pytest.raises(ValueError, match="used by the monitor's metrics"):
        MonitorMetrics(
            table,
            MetricsOptions(registry=CollectorRegistry(), labels={"kind": "x"}),
            alarm_rate=0.01,
        )


def test_default_registry_is_the_global_one(calibrated):
    model, table = calibrated
    with SurpriseMonitor(model, table, metrics=True) as monitor:
        monitor(mixed_inputs(2))
        assert prometheus_client.REGISTRY.get_sample_value("surprise_monitor_inputs_total") == 2
    assert prometheus_client.REGISTRY.get_sample_value("surprise_monitor_inputs_total") is None


def test_serve_metrics_on_loopback(calibrated):
    model, table = calibrated
    monitor = SurpriseMonitor(model, table, metrics=CollectorRegistry())
    try:
        port = monitor.serve_metrics(0)
        monitor(mixed_inputs(4))
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
        assert resp.status == 200
        assert re.search(r"^surprise_monitor_inputs_total 4\.0$", body, re.M)
        with pytest.raises(RuntimeError, match="already served"):
            monitor.serve_metrics(0)
    finally:
        monitor.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    with SurpriseMonitor(model, table) as plain, pytest.raises(RuntimeError, match="metrics=True"):
        plain.serve_metrics(0)


def test_failure_kinds_are_a_small_fixed_set(calibrated, monkeypatch):
    model, table = calibrated
    registry = CollectorRegistry()

    def broken(report):
        raise KeyError("callback bug")

    def failures() -> dict[str, float]:
        fam = _families(registry)["surprise_monitor_failures"]
        return {s.labels["kind"]: s.value for s in fam.samples if s.name.endswith("_total")}

    with SurpriseMonitor(model, table, metrics=registry, on_alarm=broken) as monitor:
        assert failures() == dict.fromkeys(FAILURE_KINDS, 0.0)  # every series from the start
        monitor(mixed_inputs(2) * float("nan"))  # every input NaN: none judged
        monitor(mixed_inputs(2), [0, 7])  # a label outside the classes: a bad input too
        flagged = int(monitor.run(mixed_inputs(4)).report.alarm.sum())
        model.train()
        try:
            monitor(mixed_inputs(2))
        finally:
            model.eval()
        monkeypatch.setattr(monitor.judge, "assemble", lambda *a: 1 / 0)
        monitor(mixed_inputs(2))
        got = failures()
    assert set(got) == set(FAILURE_KINDS)  # never an exception class name
    assert got["invalid_input"] == 2 and got["training_mode"] == 1 and got["internal"] == 1
    assert got["callback"] == flagged > 0
    assert monitor.failures["ZeroDivisionError"] == 1  # the Python API keeps the class names


def test_alarm_metrics_follow_the_reports_and_scipy(calibrated):
    """The alarm counter, the p-value histogram and the window gauges against the reports'
    values (numpy counts, scipy's KS statistic over the window's last p-values)."""
    model, table = calibrated
    registry = CollectorRegistry()
    normal = heldout_dataset(300, start=4000).tensors[0]  # no part of calibration saw them
    batches = [normal[i : i + 25] for i in range(0, 300, 25)] + [mixed_inputs(12)]
    with SurpriseMonitor(model, table, metrics=MetricsOptions(registry, window=100),
                         thresholds=Thresholds(alarm_rate=0.05)) as monitor:  # fmt: skip
        reports = [monitor.run(x).report for x in batches]
        p = torch.cat([r.p_value for r in reports]).double().numpy()
        alarms = torch.cat([r.alarm for r in reports]).numpy()
        assert np.array_equal(alarms, p <= 0.05) and alarms[-12:].sum() >= 3
        assert _value(registry, "surprise_monitor_inputs_alarmed_total") == alarms.sum()
        assert _value(registry, "surprise_monitor_p_value_count") == len(p) == 312
        assert _value(registry, "surprise_monitor_p_value_sum") == pytest.approx(p.sum())
        for bound in (0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
            got = _value(registry, "surprise_monitor_p_value_bucket", le=str(bound))
            assert got == np.count_nonzero(p <= bound), bound
        assert _value(registry, "surprise_monitor_alarm_rate_nominal") == 0.05
        assert _value(registry, "surprise_monitor_null_size") == 2000
        last = p[-100:]
        assert _value(registry, "surprise_monitor_window_size") == 100
        assert _value(registry, "surprise_monitor_window_alarm_rate") == pytest.approx(
            np.mean(last <= 0.05)
        )
        from scipy import stats

        assert _value(registry, "surprise_monitor_window_ks_distance") == pytest.approx(
            stats.kstest(last, "uniform").statistic, abs=1e-12
        )
        # normal traffic alone: p-values close to uniform (every bucket within 4 sigma)
        first = p[:300]
        for lo, hi in ((0.0, 0.1), (0.1, 0.5), (0.5, 1.0)):
            share = np.mean((first > lo) & (first <= hi))
            assert abs(share - (hi - lo)) < 4 * np.sqrt((hi - lo) * (1 - hi + lo) / 300)


def test_alarm_series_without_a_null(calibrated):
    import dataclasses

    model, table = calibrated
    registry = CollectorRegistry()
    nulls = ("null_predicted", "null_labelled", "class_null_predicted", "class_null_labelled")
    lean = dataclasses.replace(
        table, alarm=dataclasses.replace(table.alarm, **dict.fromkeys(nulls))
    )
    with SurpriseMonitor(model, lean, metrics=registry) as monitor:
        monitor(mixed_inputs(8))
        assert _value(registry, "surprise_monitor_inputs_monitored_total") == 8
        assert _value(registry, "surprise_monitor_inputs_alarmed_total") == 0
        assert _value(registry, "surprise_monitor_p_value_count") == 0
        assert _value(registry, "surprise_monitor_null_size") == 0
        assert _value(registry, "surprise_monitor_window_size") == 0
        assert math.isnan(_value(registry, "surprise_monitor_window_ks_distance"))


def test_the_window_adds_up_under_threads(calibrated):
    model, table = calibrated
    registry = CollectorRegistry()
    batches = [heldout_dataset(40, start=5000 + 40 * t).tensors[0] for t in range(6)]
    with SurpriseMonitor(model, table, metrics=registry) as monitor:
        results: dict[int, torch.Tensor] = {}

        def work(t: int) -> None:
            for chunk in batches[t].split(8):
                results.setdefault(t, [])
                results[t].append(monitor.run(chunk).report.p_value)

        run_in_threads(work, 6, timeout=60)
        every = torch.cat([torch.cat(v) for v in results.values()]).double().numpy()
        assert every.size == 240
        np.testing.assert_array_equal(np.sort(monitor.metrics.window.snapshot()), np.sort(every))
        assert _value(registry, "surprise_monitor_window_size") == 240
        assert _value(registry, "surprise_monitor_p_value_count") == 240
