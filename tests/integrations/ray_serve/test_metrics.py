"""The monitor's metrics through Ray's API agree with prometheus_client's on the same traffic."""

from __future__ import annotations

import bisect

import pytest
import torch
from prometheus_client import CollectorRegistry

from surprise_monitor.integrations.ray_serve.metrics import RayMetricsRegistry, ray_boundaries
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.options import MetricsOptions, Sampling
from surprise_monitor.monitor.runtime.metrics import table_info
from tests._models import heldout_dataset

NS = "surprise_monitor_"


def test_bounds_become_positive_and_keep_exactly_zero():
    assert ray_boundaries((0.0, 1.0, 2.0, 4.0)) == [0.5, 1.0, 2.0, 4.0]
    assert ray_boundaries((-1.0, -0.1, 0.0, 0.1, 1.0)) == [0.05, 0.1, 1.0]
    assert ray_boundaries((-3.0, -1.0)) == [1.0]
    assert ray_boundaries((0.001, 0.5, 1.0)) == [0.001, 0.5, 1.0]


def _traffic() -> list[torch.Tensor]:
    normal = heldout_dataset(300, start=6000).tensors[0]
    noise = -5.0 + 9.4 * torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x = torch.cat([normal, noise])[torch.randperm(340, generator=torch.Generator().manual_seed(1))]
    return list(x.split(17))


def _run(model, table, options: MetricsOptions) -> SurpriseMonitor:
    monitor = SurpriseMonitor(model, table, metrics=options, sampling=Sampling(every=3))
    for x in _traffic():
        monitor(x)
    return monitor


def test_the_same_series_as_prometheus_client_on_the_same_traffic(calibrated, fake_ray_metrics):
    """The oracle is the prometheus_client path: every counter, every histogram bucket (after
    Ray's bound changes) and every gauge must match."""
    model, table = calibrated
    prom = CollectorRegistry()
    reference = _run(model, table, MetricsOptions(registry=prom, labels={"model": "tiny"}))
    window_reference = reference.metrics.window.stats()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value for m in prom.collect() for s in m.samples
    }  # read before close() removes the series
    reference.close()
    ray_registry = RayMetricsRegistry(metrics_module=fake_ray_metrics)
    monitor = _run(model, table, MetricsOptions(registry=ray_registry, labels={"model": "tiny"}))
    made = fake_ray_metrics.made
    tags = {"model": "tiny"}

    def prom_value(name: str, **labels: str) -> float:
        return samples.get((NS + name, frozenset({**tags, **labels}.items())), 0.0)

    assert made[NS + "inputs"].total(**tags) == prom_value("inputs_total") == 340
    assert made[NS + "inputs_monitored"].total() == prom_value("inputs_monitored_total") > 0
    assert made[NS + "inputs_alarmed"].total() == prom_value("inputs_alarmed_total") >= 10
    for reason in ("sampled_out", "failed"):
        got = made[NS + "inputs_skipped"].total(reason=reason)
        assert got == prom_value("inputs_skipped_total", reason=reason)
    for kind in ("surprise", "expectation", "low_beta"):
        got = made[NS + "inputs_flagged"].total(kind=kind)
        assert got == prom_value("inputs_flagged_total", kind=kind)
    assert made[NS + "filters_judged"].total() == prom_value("filters_judged_total")

    # histograms: the same observations, so the same count under every bound both keep
    for name in ("p_value", "surprising_filters", "expected_filters", "beta_percentile_ratio"):
        metric = made[NS + name]
        observed = sorted(v for values in metric.observed.values() for v in values)
        assert len(observed) == prom_value(name + "_count") > 0
        for bound in metric.boundaries:
            below = bisect.bisect_right(observed, bound)
            le = "0.0" if bound == metric.boundaries[0] and name.endswith("filters") else str(bound)
            assert below == prom_value(name + "_bucket", le=le), (name, bound)
    beta = made[NS + "beta"]
    assert all(b > 0 for b in beta.boundaries)  # beta's negative bounds are left out

    # gauges, set again on every refresh (Ray exports a gauge only while it is set)
    sets = made[NS + "null_size"].sets
    ray_registry.refresh()
    assert made[NS + "null_size"].sets == sets + 1
    assert made[NS + "null_size"].total() == prom_value("null_size") == 2000
    assert made[NS + "alarm_rate_nominal"].total() == prom_value("alarm_rate_nominal")
    size, rate, ks = monitor.metrics.window.stats()
    assert (size, rate, ks) == window_reference
    assert made[NS + "window_size"].total() == size
    assert made[NS + "window_alarm_rate"].total() == pytest.approx(rate)
    assert made[NS + "window_ks_distance"].total() == pytest.approx(ks)
    info = made[NS + "table_info"]
    assert list(info.values) == [tuple(sorted({**tags, **table_info(table)}.items()))]
    monitor.close()
    ray_registry.close()


def test_a_registry_refuses_a_bad_refresh_period(fake_ray_metrics):
    with pytest.raises(ValueError, match="refresh_seconds"):
        RayMetricsRegistry(0, metrics_module=fake_ray_metrics)
