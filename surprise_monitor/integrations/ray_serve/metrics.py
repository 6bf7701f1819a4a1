"""The monitor's Prometheus metrics recorded through Ray's metrics API, in a Ray Serve replica.

``MonitorMetrics`` makes its metrics with prometheus_client's classes in a registry; given a
:class:`RayMetricsRegistry` it asks the registry to make them instead (its ``metric_factory``),
and gets Ray metrics (``ray.serve.metrics``) behind prometheus_client's interface (``labels``,
``inc``, ``observe``, ``set``, ``set_function``, ``info``, ``remove``). Ray tags each series with
the replica, deployment and application, and every node's metrics agent exports them, so one
scrape of Ray's metrics endpoint carries every replica's series.

What changes on the way (the names and meanings otherwise stay those of
:mod:`surprise_monitor.monitor.runtime.metrics`):

- Ray prefixes the names with ``ray_``: ``surprise_monitor_inputs_total`` is exported as
  ``ray_surprise_monitor_inputs_total`` (``serve/config/alerts-ray.yml`` reads those names).
- Ray's histograms take positive bucket bounds only. A bound of 0 (``surprising_filters``,
  ``expected_filters``: "no filter") becomes half the smallest positive bound, which keeps
  "exactly 0" for counts; negative bounds (``beta``'s lower buckets) are left out, so beta's
  histogram keeps only its positive buckets (``beta_percentile_ratio`` carries beta's rank).
- ``table_info`` is a gauge set to 1 with the table's labels (Ray has no info metric).
- A series exists once first recorded (Ray cannot export a counter at 0), and nothing is removed
  from Ray's export when a monitor closes.
- Ray exports a gauge only while it is being set, so every gauge (the constant ones such as
  ``alarm_rate_nominal`` and ``null_size`` too) is set again on a background thread every
  ``refresh_seconds``; the ``set_function`` ones (the window's alarm rate, size and KS
  distance) are recomputed there.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info


def ray_boundaries(buckets: Sequence[float]) -> list[float]:
    """A prometheus histogram's bucket bounds as Ray takes them: positive only; a bound of 0
    becomes half the smallest positive bound (counts keep "exactly 0"), negative bounds are
    dropped; ``[1.0]`` when none is positive."""
    positive = sorted({float(b) for b in buckets if math.isfinite(b) and b > 0})
    if not positive:
        return [1.0]
    if any(b == 0 for b in buckets):
        positive.insert(0, positive[0] / 2.0)
    return positive


class RayMetricsRegistry:
    """Where a ``SurpriseMonitor``'s metrics go in a Ray Serve replica:
    ``MetricsOptions(registry=RayMetricsRegistry())``.

    Args:
        refresh_seconds: how often the ``set_function`` gauges are recomputed.
        metrics_module: the module holding Ray's ``Counter``, ``Gauge`` and ``Histogram``
            (default ``ray.serve.metrics``, which adds the replica's tags); tests pass a fake.
    """

    def __init__(self, refresh_seconds: float = 1.0, metrics_module: Any = None) -> None:
        if not refresh_seconds > 0:
            raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
        if metrics_module is None:
            from ray.serve import metrics as metrics_module
        self.refresh_seconds = float(refresh_seconds)
        self.module = metrics_module
        self._functions: dict[tuple[int, tuple[str, ...]], tuple[Callable, Callable]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def metric_factory(
        self, kind: type, name: str, documentation: str, labelnames: Sequence[str],
        namespace: str, extra: Mapping[str, Any],
    ) -> RayMetric:  # fmt: skip
        """A Ray metric with prometheus_client's interface (``MonitorMetrics`` calls this)."""
        full = f"{namespace}_{name}" if namespace else name
        return RayMetric(self, kind, full, documentation, tuple(labelnames), dict(extra))

    def unregister(self, metric: Any) -> None:
        """Stop refreshing ``metric``'s ``set_function`` series (Ray keeps exporting the last
        values: its API removes nothing)."""
        with self._lock:
            for key in [k for k in self._functions if k[0] == id(metric)]:
                del self._functions[key]

    def track(
        self, key: tuple[int, tuple[str, ...]], setter: Callable[[float], None],
        fn: Callable[[], float],
    ) -> None:  # fmt: skip
        """Call ``setter(fn())`` every ``refresh_seconds`` (and once now); ``key`` names the
        series (a new ``fn`` for it replaces the old)."""
        with self._lock:
            self._functions[key] = (setter, fn)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_refresh_loop, args=(weakref.ref(self), self._stop),
                    name="surprise-ray-metrics", daemon=True,
                )  # fmt: skip
                self._thread.start()
        setter(float(fn()))

    def untrack(self, metric: RayMetric, values: tuple[str, ...]) -> None:
        """Stop refreshing one series."""
        with self._lock:
            self._functions.pop((id(metric), values), None)

    def refresh(self) -> None:
        """Recompute every ``set_function`` series now (a failing function is skipped)."""
        with self._lock:
            tracked = list(self._functions.values())
        for setter, fn in tracked:
            try:
                setter(float(fn()))
            except Exception:  # a gauge must never break the replica
                continue

    def close(self) -> None:
        """Stop the refreshing thread."""
        self._stop.set()


def _refresh_loop(ref: weakref.ref, stop: threading.Event) -> None:
    """The background refresh; ends when the registry is closed or collected."""
    while True:
        registry = ref()
        if registry is None:
            return
        interval = registry.refresh_seconds
        registry.refresh()
        del registry
        if stop.wait(interval):
            return


class RayMetric:
    """One metric of the monitor's family, recorded through Ray (prometheus_client's
    interface: ``labels(*values)`` gives a series; without label names the metric is its only
    series)."""

    def __init__(
        self, registry: RayMetricsRegistry, kind: type, name: str, documentation: str,
        labelnames: tuple[str, ...], extra: dict[str, Any],
    ) -> None:  # fmt: skip
        self.registry, self.kind, self.name = registry, kind, name
        self.documentation, self.labelnames = documentation, labelnames
        module = registry.module
        if kind is Counter:
            self.ray = module.Counter(name, description=documentation, tag_keys=labelnames)
        elif kind is Gauge:
            self.ray = module.Gauge(name, description=documentation, tag_keys=labelnames)
        elif kind is Histogram:
            bounds = ray_boundaries(extra.get("buckets", (1.0,)))
            self.ray = module.Histogram(
                name, description=documentation, boundaries=bounds, tag_keys=labelnames
            )
        elif kind is Info:
            self.ray = None  # made on the first info(): its tag keys are the info's keys
        else:
            raise TypeError(f"no Ray metric for {kind.__name__}")
        self._info: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> _Series:
        """The series of these label values."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for {self.labelnames}")
        return _Series(self, tuple(str(v) for v in values))

    def remove(self, *values: str) -> None:
        """Stop refreshing the series (Ray keeps its last value)."""
        self.registry.untrack(self, tuple(str(v) for v in values))

    # the metric without labels is its own series
    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to the metric's only series."""
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        """Observe ``value`` (in the metric's only series / this series)."""
        self.labels().observe(value)

    def set(self, value: float) -> None:
        """Set the metric's only series."""
        self.labels().set(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Compute the metric's only series from ``fn`` on every refresh."""
        self.labels().set_function(fn)

    def info(self, values: Mapping[str, str]) -> None:
        """The info labels of the metric's only series."""
        self.labels().info(values)

    def info_gauge(self, keys: tuple[str, ...]) -> Any:
        """The Ray gauge behind an info metric with these extra keys (``<name>_info``)."""
        gauge = self._info.get(keys)
        if gauge is None:
            gauge = self.registry.module.Gauge(
                f"{self.name}_info", description=self.documentation,
                tag_keys=self.labelnames + keys,
            )  # fmt: skip
            self._info[keys] = gauge
        return gauge


class _Series:
    """One labelled series of a :class:`RayMetric`."""

    def __init__(self, metric: RayMetric, values: tuple[str, ...]) -> None:
        self.metric, self.values = metric, values
        self.tags = dict(zip(metric.labelnames, values, strict=True))

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (Ray refuses 0: nothing to record)."""
        if amount > 0:
            self.metric.ray.inc(float(amount), tags=self.tags)

    def observe(self, value: float) -> None:
        """Observe ``value`` (in the metric's only series / this series)."""
        self.metric.ray.observe(float(value), tags=self.tags)

    def _set_now(self, value: float) -> None:
        """Set the Ray gauge now (the refresh thread calls this)."""
        self.metric.ray.set(value, tags=self.tags)

    def set(self, value: float) -> None:
        """Set the gauge (and again on every refresh, so Ray keeps exporting it)."""
        value = float(value)
        self.set_function(lambda: value)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Recompute from ``fn`` on the registry's refresh thread."""
        self.metric.registry.track((id(self.metric), self.values), self._set_now, fn)

    def info(self, values: Mapping[str, str]) -> None:
        """An info metric's labels: ``<name>_info`` = 1 with them as tags (set again on every
        refresh)."""
        keys = tuple(sorted(values))
        gauge = self.metric.info_gauge(keys)
        tags = {**self.tags, **{k: str(values[k]) for k in keys}}
        self.metric.registry.track(
            (id(self.metric), self.values), lambda v: gauge.set(v, tags=tags), lambda: 1.0
        )
