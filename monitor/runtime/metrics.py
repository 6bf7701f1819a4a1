"""Prometheus metrics of a :class:`~surprise_monitor.monitor.SurpriseMonitor`, in a registry the
caller chooses.

Names follow the Prometheus conventions (``_total`` counters, ``_seconds`` durations, base
units, low-cardinality labels). With the default namespace ``surprise_monitor``:

==========================================  ========================================================
``surprise_monitor_inputs_total``            inputs passed to the monitored model
``surprise_monitor_inputs_monitored_total``  inputs judged against the calibration table
``surprise_monitor_inputs_flagged_total``    judged inputs flagged, by ``kind``: ``surprise`` (any
                                             surprising filter), ``expectation``, ``low_beta``
``surprise_monitor_inputs_skipped_total``    inputs not judged, by ``reason``: ``sampled_out``,
                                             ``queue_full`` (async mode), ``failed`` (monitoring
                                             failed), ``model_error`` (the model itself raised)
``surprise_monitor_failures_total``          failed monitoring calls, by ``kind``: one of
                                             :data:`FAILURE_KINDS`
``surprise_monitor_filters_judged_total``    (input, filter) pairs judged: judged inputs x N
``surprise_monitor_beta``                    histogram of beta per judged input (no ``_sum``
                                             when a bucket is negative: prometheus_client's rule)
``surprise_monitor_beta_percentile_ratio``   histogram of beta's rank in its class's calibration
                                             betas, as a ratio (0..1)
``surprise_monitor_surprising_filters``      histogram of surprising filters per judged input
``surprise_monitor_expected_filters``        histogram of expected filters per judged input
``surprise_monitor_added_latency_seconds``   time the monitor added to the request path, per call
``surprise_monitor_inspect_duration_seconds`` time to judge one batch (off the path in async mode)
``surprise_monitor_queue_depth``             batches waiting for the async worker
``surprise_monitor_table_info``              1, labelled with the table: ``layer``, ``filters``,
                                             ``table_fingerprint`` (its SHA-256), ``created``
``surprise_monitor_inputs_alarmed_total``    judged inputs that alarmed (``report.alarm``: conformal
                                             p-value <= the nominal alarm rate)
``surprise_monitor_p_value``                 histogram of the judged inputs' conformal p-values
                                             (uniform under normal traffic; buckets dense near 0)
``surprise_monitor_alarm_rate_nominal``      the monitor's ``alarm_rate`` (the nominal false-alarm
                                             rate; rules compare with it)
``surprise_monitor_null_size``               held-out images in the table's conformal null (n; 0
                                             without one: then nothing alarms)
``surprise_monitor_window_size``             p-values in the sliding window now (m <= ``window``)
``surprise_monitor_window_alarm_rate``       fraction of the window's p-values <= ``alarm_rate``
``surprise_monitor_window_ks_distance``      Kolmogorov-Smirnov distance of the window's p-values
                                             from Uniform(0, 1) (drift; compare with
                                             ``c(a) * sqrt(1/m + 1/n)``)
==========================================  ========================================================

The alarm series count only inputs with a p-value (a table with a held-out null): the p-value
histogram's ``_count`` is the denominator of the alarm rate. The window holds the last
``window`` (default 1000) judged p-values of this monitor; its gauges are computed when
scraped (:mod:`surprise_monitor.monitor.runtime.window`), never on the request path.

Once the async queue is drained, ``inputs_total`` equals ``inputs_monitored_total`` plus the
sum of ``inputs_skipped_total`` over its reasons, in every mode. A per-class ``class`` label
(the class name) is added to the monitored, flagged and alarmed counters only with
``per_class=True``: it multiplies their series by the number of classes.

In a Ray Serve replica the same metrics are recorded through Ray's metrics API instead
(``MetricsOptions(registry=RayMetricsRegistry())``,
:mod:`surprise_monitor.integrations.ray_serve.metrics`): Ray exports them with a ``ray_`` prefix
and the replica's tags.

Monitors share metric families per (registry, namespace): two monitors in one registry either
use different namespaces or the same constant ``labels`` keys with different values (e.g.
``{"model": "resnet50"}`` and ``{"model": "vgg16"}``); anything else is a
:class:`MetricsConflictError`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.options import MetricsOptions
from surprise_monitor.monitor.runtime.window import PValueWindow

if TYPE_CHECKING:
    from surprise_monitor.monitor.report import MonitorReport
    from surprise_monitor.monitor.table import CalibrationTable

FLAG_KINDS = ("surprise", "expectation", "low_beta")
SKIP_REASONS = ("sampled_out", "queue_full", "failed", "model_error")
#: ``failures_total`` kinds: a bad input (shape, dtype, NaN/Inf, labels), a model in training
#: mode, a table that does not fit the model, non-finite alpha, out of device memory, an
#: exception in ``on_alarm`` or the alarm recorder, anything else.
FAILURE_KINDS = (
    "invalid_input", "training_mode", "table_mismatch", "nonfinite_alpha", "out_of_memory",
    "callback", "internal",
)  # fmt: skip
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
#: p-value buckets: dense near 0, where alarms are (a nominal rate of 0.1% .. 5% reads off a
#: bucket), then every 0.1: under normal traffic each bucket's share is its width.
P_VALUE_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
RATIO_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0,
)  # fmt: skip
_BETA_LEVELS = (0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
_RESERVED = (
    "kind", "reason", "class", "le", "quantile", "layer", "filters", "table_fingerprint", "created",
)  # fmt: skip


class MetricsConflictError(SurpriseMonitorError, ValueError):
    """The registry already holds metrics that this monitor's metrics would collide with."""


def failure_kind(exc: BaseException, prefix: str = "") -> str:
    """The :data:`FAILURE_KINDS` label of a monitoring failure (a ``prefix``, ``"on_alarm:"`` or
    ``"recorder:"``: an exception in the callback or the alarm recorder)."""
    from surprise_monitor.monitor.judge import (
        InvalidInputError,
        NonFiniteAlphaError,
        TableMismatchError,
        TrainingModeError,
    )

    if prefix:
        return "callback"
    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        ((InvalidInputError, TypeError), "invalid_input"),
        (TrainingModeError, "training_mode"),
        (TableMismatchError, "table_mismatch"),
        (NonFiniteAlphaError, "nonfinite_alpha"),
        (torch.OutOfMemoryError, "out_of_memory"),
    )
    return next((kind for types, kind in kinds if isinstance(exc, types)), "internal")


def count_buckets(num_filters: int) -> tuple[float, ...]:
    """``0, 1, 2, 4, ...`` up to the first power of two >= ``num_filters``."""
    out, b = [0.0], 1
    while True:
        out.append(float(b))
        if b >= num_filters:
            return tuple(out)
        b *= 2


def beta_buckets_from(table: CalibrationTable) -> tuple[float, ...]:
    """Histogram buckets for beta: the calibration betas' percentiles (0.1 ... 99.9), each the
    median over the calibrated classes, to 3 significant digits."""
    calibrated = table.counts > 0
    if not bool(calibrated.any()):
        return (-1.0, -0.1, 0.0, 0.1, 1.0)
    values = []
    for pct in _BETA_LEVELS:
        v = float(table.beta_value_at(pct)[calibrated].float().median())
        if math.isfinite(v):
            values.append(float(f"{v:.3g}"))
    out = tuple(sorted(set(values)))
    return out if len(out) >= 2 else (-1.0, -0.1, 0.0, 0.1, 1.0)


def table_info(table: CalibrationTable) -> dict[str, str]:
    """The ``table_info`` metric's labels: layer, filters, table_fingerprint, created."""
    return {
        "layer": table.layer,
        "filters": str(table.num_filters),
        "table_fingerprint": table.fingerprint(),
        "created": table.created,
    }


@dataclass
class _Family:
    """The metric objects of one (registry, namespace), shared by its monitors."""

    label_names: tuple[str, ...]
    per_class: bool
    beta_buckets: tuple[float, ...]
    metrics: dict[str, Counter | Gauge | Histogram | Info]
    members: set[tuple[str, ...]] = field(default_factory=set)


_FAMILIES: WeakKeyDictionary[CollectorRegistry, dict[str, _Family]] = WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


_MetricSpec = tuple[type, str, str, tuple[str, ...], dict]


def _alarm_specs(ln: tuple[str, ...], cls: tuple[str, ...]) -> dict[str, _MetricSpec]:
    """The alarm's metrics in :func:`_family_specs`' form (``cls``: the per-class label)."""
    return {
        "alarmed": (
            Counter, "inputs_alarmed",
            "Judged inputs that alarmed: conformal p-value at most the nominal alarm rate.",
            ln + cls, {},
        ),
        "p_value": (
            Histogram, "p_value",
            "Conformal p-value of each judged input among the table's held-out images (uniform "
            "under normal traffic).", ln, {"buckets": P_VALUE_BUCKETS},
        ),
        "alarm_nominal": (
            Gauge, "alarm_rate_nominal", "The nominal false-alarm rate (the monitor's "
            "alarm_rate).", ln, {},
        ),
        "null_size": (
            Gauge, "null_size", "Held-out images in the table's conformal null (0: no alarms).",
            ln, {},
        ),
        "window_size": (
            Gauge, "window_size", "p-values in the sliding window now.", ln, {},
        ),
        "window_alarm_rate": (
            Gauge, "window_alarm_rate",
            "Fraction of the sliding window's p-values at most the nominal alarm rate.", ln, {},
        ),
        "window_ks": (
            Gauge, "window_ks_distance", "Kolmogorov-Smirnov distance of the sliding window's "
            "p-values from Uniform(0,1).", ln, {},
        ),
    }  # fmt: skip


def _family_specs(
    label_names: tuple[str, ...],
    per_class: bool,
    beta_buckets: tuple[float, ...],
    count_bounds: tuple[float, ...],
) -> dict[str, _MetricSpec]:
    """``key: (kind, name, help, label names, extra arguments)`` of every metric in a family."""
    cls = ("class",) if per_class else ()
    ln = label_names
    return {
        "inputs": (Counter, "inputs", "Inputs passed to the monitored model.", ln, {}),
        "monitored": (
            Counter, "inputs_monitored", "Inputs judged against the calibration table.",
            ln + cls, {},
        ),
        "flagged": (
            Counter, "inputs_flagged",
            "Judged inputs flagged, by kind (surprise: any surprising filter; expectation: any "
            "expected filter; low_beta: beta below the class's calibrated threshold).",
            ln + ("kind",) + cls, {},
        ),
        "skipped": (
            Counter, "inputs_skipped",
            "Inputs not judged, by reason (sampled_out, queue_full, failed, model_error).",
            ln + ("reason",), {},
        ),
        "failures": (
            Counter, "failures",
            "Failed monitoring calls, by kind (" + ", ".join(FAILURE_KINDS) + ").",
            ln + ("kind",), {},
        ),
        "filters_judged": (
            Counter, "filters_judged",
            "(input, filter) pairs judged: judged inputs times the layer's filters.", ln, {},
        ),
        "beta": (
            Histogram, "beta", "beta = mean over filters of (alpha - mu) per judged input.", ln,
            {"buckets": beta_buckets},
        ),
        "beta_percentile": (
            Histogram, "beta_percentile_ratio",
            "Rank of beta among the class's calibration betas as a ratio (0..1), per judged "
            "input.", ln, {"buckets": RATIO_BUCKETS},
        ),
        "surprising": (
            Histogram, "surprising_filters", "Surprising filters per judged input.", ln,
            {"buckets": count_bounds},
        ),
        "expected": (
            Histogram, "expected_filters", "Expected filters per judged input.", ln,
            {"buckets": count_bounds},
        ),
        "added_latency": (
            Histogram, "added_latency_seconds",
            "Time the monitor added to the request path, per call.", ln,
            {"buckets": LATENCY_BUCKETS},
        ),
        "inspect_duration": (
            Histogram, "inspect_duration_seconds",
            "Time to judge one batch (on the worker thread in async mode).", ln,
            {"buckets": LATENCY_BUCKETS},
        ),
        "queue_depth": (Gauge, "queue_depth", "Batches waiting for the async worker.", ln, {}),
        **_alarm_specs(ln, cls),
        "info": (
            Info, "table", "The calibration table: layer, filters, table_fingerprint (SHA-256), "
            "created.", ln, {},
        ),
    }  # fmt: skip


def _build_family(
    registry: CollectorRegistry,
    namespace: str,
    label_names: tuple[str, ...],
    per_class: bool,
    beta_buckets: tuple[float, ...],
    count_bounds: tuple[float, ...],
) -> _Family:
    """Register a new family's metrics in ``registry`` (all or none of them)."""
    specs = _family_specs(label_names, per_class, beta_buckets, count_bounds)
    made: dict[str, Counter | Gauge | Histogram | Info] = {}
    # A registry with a metric_factory makes the metrics itself, with prometheus_client's
    # interface (e.g. surprise_monitor.integrations.ray_serve.metrics.RayMetricsRegistry).
    factory = getattr(registry, "metric_factory", None)
    try:
        for key, (kind, name, doc, labels, extra) in specs.items():
            if factory is not None:
                made[key] = factory(kind, name, doc, labels, namespace, extra)
                continue
            made[key] = kind(
                name, doc, labelnames=labels, namespace=namespace, registry=registry, **extra
            )
    except ValueError as exc:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
        for metric in made.values():
            registry.unregister(metric)
        raise MetricsConflictError(
            f"metrics named {namespace}_* are already registered in this registry by something "
            f"other than a surprise monitor ({exc}); pass another namespace= or registry="
        ) from exc
    return _Family(label_names, per_class, beta_buckets, made)


class MonitorMetrics:
    """One monitor's metrics, registered in ``options.registry`` (default: the global one).

    Args:
        table: the monitor's calibration table (class names, filter count, beta scale).
        options: registry, namespace, constant labels, per-class counters, window, beta buckets
            (:class:`~surprise_monitor.monitor.options.MetricsOptions`; per-class counters add
            one series per class and kind).
        alarm_rate: the monitor's nominal alarm rate (exported, and the window's threshold).
    """

    def __init__(
        self,
        table: CalibrationTable,
        options: MetricsOptions,
        *,
        alarm_rate: float,
    ) -> None:
        self.options = options
        self.window = PValueWindow(options.window, alarm_rate)
        self.registry = REGISTRY if options.registry is None else options.registry
        self.namespace = options.namespace
        labels = dict(options.labels)
        per_class, beta_buckets = options.per_class, options.beta_buckets
        clash = sorted(set(labels) & set(_RESERVED))
        if clash:
            raise ValueError(f"constant label names {clash} are used by the monitor's metrics")
        self.label_names = tuple(sorted(labels))
        self.label_values = tuple(labels[k] for k in self.label_names)
        self.per_class = bool(per_class)
        self.class_names = [str(c) for c in table.class_names] or [
            str(c) for c in range(table.num_classes)
        ]
        buckets = tuple(float(b) for b in beta_buckets) if beta_buckets else None
        family = self._join_family(table, buckets)
        self._family = family
        self.beta_buckets = family.beta_buckets
        self._lock = threading.Lock()
        self._children: set[tuple[str, tuple[str, ...]]] = set()
        self._closed = False
        # Series that alerts divide by exist from the start (at 0), so rates are never absent.
        self._inputs = self._child("inputs")
        self._skipped = {r: self._child("skipped", r) for r in SKIP_REASONS}
        if not self.per_class:
            self._monitored = self._child("monitored")
            self._flagged = {k: self._child("flagged", k) for k in FLAG_KINDS}
        self._beta = self._child("beta")
        self._beta_pct = self._child("beta_percentile")
        self._surprising = self._child("surprising")
        self._expected = self._child("expected")
        self._added = self._child("added_latency")
        self._inspect = self._child("inspect_duration")
        self._queue = self._child("queue_depth")
        self._filters_judged = self._child("filters_judged")
        self._failures = {k: self._child("failures", k) for k in FAILURE_KINDS}
        self._child("info").info(table_info(table))
        self._init_alarm_series(table)

    def _init_alarm_series(self, table: CalibrationTable) -> None:
        """The alarm's series: counter (without ``class``), p-value histogram, the nominal rate
        and null size, and the window's gauges (computed when scraped)."""
        if not self.per_class:
            self._alarmed = self._child("alarmed")
        self._p_value = self._child("p_value")
        self._child("alarm_nominal").set(self.window.alarm_rate)
        alarm = table.alarm
        null = alarm.null_predicted if alarm is not None and alarm.has_null else None
        self._child("null_size").set(0 if null is None else null.size)
        window = self.window
        self._child("window_size").set_function(lambda: float(window.stats()[0]))
        self._child("window_alarm_rate").set_function(lambda: window.stats()[1])
        self._child("window_ks").set_function(lambda: window.stats()[2])

    def _join_family(self, table: CalibrationTable, buckets: tuple[float, ...] | None) -> _Family:
        """This registry's family under this namespace (made on first use), with this monitor
        added as a member; :class:`MetricsConflictError` if it cannot join."""
        namespace = self.namespace
        with _FAMILIES_LOCK:
            families = _FAMILIES.setdefault(self.registry, {})
            family = families.get(namespace)
            if family is None:
                family = _build_family(
                    self.registry, namespace, self.label_names, self.per_class,
                    buckets or beta_buckets_from(table), count_buckets(table.num_filters),
                )  # fmt: skip
                families[namespace] = family
            elif family.label_names != self.label_names or family.per_class != self.per_class:
                raise MetricsConflictError(
                    f"another monitor in this registry uses namespace {namespace!r} with "
                    f"constant labels {list(family.label_names)} and per_class="
                    f"{family.per_class}; use the same label names and per_class, or another "
                    "namespace"
                )
            elif buckets is not None and buckets != family.beta_buckets:
                raise MetricsConflictError(
                    f"namespace {namespace!r} already has beta buckets {family.beta_buckets}"
                )
            if self.label_values in family.members:
                shown = dict(zip(self.label_names, self.label_values, strict=True))
                raise MetricsConflictError(
                    f"a monitor with namespace {namespace!r} and constant labels {shown} is "
                    "already registered in this registry; give each monitor distinct labels= "
                    "(e.g. {'model': 'name'}) or another namespace, or close() the other one"
                )
            family.members.add(self.label_values)
        return family

    def _child(self, key: str, *extra: str) -> Any:
        """The metric ``key``'s series for this monitor's labels plus ``extra`` (recorded, so
        :meth:`close` can remove it)."""
        values = self.label_values + extra
        with self._lock:
            self._children.add((key, values))
        metric = self._family.metrics[key]
        return metric.labels(*values) if values else metric

    # ------------------------------------------------------------- recording
    def inputs_seen(self, n: int) -> None:
        """``n`` inputs reached the monitored model."""
        self._inputs.inc(n)

    def skipped(self, reason: str, n: int) -> None:
        """``n`` inputs were not judged, for ``reason`` (one of :data:`SKIP_REASONS`)."""
        if n:
            self._skipped[reason].inc(n)

    def failure(self, kind: str) -> None:
        """One monitoring call failed, of this kind (one of :data:`FAILURE_KINDS`)."""
        self._failures[kind if kind in self._failures else "internal"].inc()

    def added_latency(self, seconds: float) -> None:
        """Time the monitor added to one call on the request path."""
        self._added.observe(max(seconds, 0.0))

    def inspect_duration(self, seconds: float) -> None:
        """Time one batch took to judge."""
        self._inspect.observe(max(seconds, 0.0))

    def queue_depth(self, depth: int) -> None:
        """Batches waiting for the async worker now."""
        self._queue.set(depth)

    def observe(self, report: MonitorReport) -> None:
        """Count a judged batch: inputs, flags by kind, and the per-input histograms."""
        n = len(report)
        if n == 0:
            return
        flags = {
            "surprise": report.surprise.any(dim=1),
            "expectation": report.expectation.any(dim=1),
            "low_beta": report.low_beta,
        }
        if self.per_class:
            classes = report.classes
            for c in torch.unique(classes).tolist():
                rows = classes == c
                name = self.class_names[c] if c < len(self.class_names) else str(c)
                self._child("monitored", name).inc(int(rows.sum()))
                for kind, flagged in flags.items():
                    hits = int((flagged & rows).sum())
                    child = self._child("flagged", kind, name)
                    if hits:
                        child.inc(hits)
        else:
            self._monitored.inc(n)
            for kind, flagged in flags.items():
                hits = int(flagged.sum())
                if hits:
                    self._flagged[kind].inc(hits)
        self._observe_alarms(report)
        self._filters_judged.inc(n * int(report.surprise.shape[1]))
        for beta, pct, s, e in zip(
            report.beta.tolist(), report.beta_percentile.tolist(),
            report.surprise_count.tolist(), report.expectation_count.tolist(), strict=True,
        ):  # fmt: skip
            self._beta.observe(beta)
            self._beta_pct.observe(pct / 100.0)
            self._surprising.observe(s)
            self._expected.observe(e)

    def _observe_alarms(self, report: MonitorReport) -> None:
        """Count the batch's alarms (by class with ``per_class``), its p-values in the
        histogram and the window (inputs without a p-value are left out of both)."""
        p_values = report.p_value.tolist()
        alarms = report.alarm
        if self.per_class:
            classes = report.classes
            for c in torch.unique(classes).tolist():
                name = self.class_names[c] if c < len(self.class_names) else str(c)
                hits = int((alarms & (classes == c)).sum())
                child = self._child("alarmed", name)  # exists at 0 for every class seen
                if hits:
                    child.inc(hits)
        else:
            hits = int(alarms.sum())
            if hits:
                self._alarmed.inc(hits)
        for p in p_values:
            if p == p:  # NaN: the table has no null
                self._p_value.observe(p)
        self.window.add(p_values)

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove this monitor's series; the family leaves the registry with its last monitor."""
        with _FAMILIES_LOCK:
            if self._closed:
                return
            self._closed = True
            family = self._family
            with self._lock:
                children = list(self._children)
            for key, values in children:
                if values:
                    try:
                        family.metrics[key].remove(*values)
                    except KeyError:
                        pass
            family.members.discard(self.label_values)
            if not family.members:
                for metric in family.metrics.values():
                    try:
                        self.registry.unregister(metric)
                    except KeyError:
                        pass
                families = _FAMILIES.get(self.registry, {})
                if families.get(self.namespace) is family:
                    del families[self.namespace]
