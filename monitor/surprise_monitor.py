"""``SurpriseMonitor``: the public facade. It wraps a CNN, has a
:class:`~surprise_monitor.monitor.judge.Judge` judge its inputs against the calibration table, and
puts the request path (:class:`~surprise_monitor.monitor.runtime.RequestPath`: sampling, async mode,
fail-open, callbacks, metrics) around it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from surprise_monitor.monitor.judge import Judge
from surprise_monitor.monitor.options import DEFAULT_NAMESPACE, MetricsOptions
from surprise_monitor.monitor.probe.grad_amap_probe import GradAMapProbe
from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.runtime.metrics import MonitorMetrics
from surprise_monitor.monitor.runtime.request_path import (
    AlarmRecorder,
    MonitorResult,
    RequestPath,
    check_mode,
)
from surprise_monitor.monitor.runtime.sampling import Sampler
from surprise_monitor.monitor.table import CalibrationTable

if TYPE_CHECKING:
    from surprise_monitor.monitor.explain.explanation import Explanation
    from surprise_monitor.monitor.explain.fixes import FixResult


log = logging.getLogger(__name__)


class SurpriseMonitor:
    """Watches a CNN at inference time: surprise, expectation and beta per input.

    Args:
        model: the CNN (``nn.Module``) in eval mode, float32, float16 or bfloat16 (its inputs
            are its own dtype); it is not modified, and :meth:`close` removes the forward hooks
            the monitor adds (the monitored layer's and the alarm's profile layers'). While
            watched it can still be deep-copied, pickled and ``torch.save``-d: a copy carries
            inert hooks (``InertHook``) and is not watched.
        table: a :class:`~surprise_monitor.monitor.table.CalibrationTable` or the path of a saved
        one.
        layer: target layer; ``None`` uses the table's. Another name than the table's is refused.
        surprise_pct: a filter is surprising when ``alpha > P_cn(surprise_pct)``.
        expectation_pct: a filter is expected when ``alpha < P_cn(expectation_pct)`` and
            ``mu_cn > mean_n(mu_cn)``.
        low_beta_pct: an input has a low beta when its beta is below this percentile of the
            class's calibration betas.
        check_fingerprint: refuse a table whose model-weights fingerprint differs (turn off for a
            deliberately changed model).
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
        strict_input_size: refuse inputs whose H x W differ from the calibration images.
        backend: kernel backend, ``"auto"``, ``"triton"`` or ``"torch"``.
        cuda_graphs: on CUDA, capture the whole monitoring step (probe, kernels, lookup,
            flags) into a CUDA graph per input signature (shape, dtype, labels given or not,
            autocast) and replay it on later calls: the first call of a signature runs
            eagerly, the second captures. Off by default until it is measured on a GPU; a
            failed capture turns graphs off and the monitor runs eagerly (see
            :mod:`surprise_monitor.monitor.cuda_graphs`).
        max_graphs: graphs kept at most (least recently used dropped first).
        alarm_rate: the per-input alarm's nominal false-alarm rate: an input alarms
            (``report.alarm``) when its conformal p-value among the table's held-out images is
            at most this, so at most this fraction of normal inputs alarm. Needs a table
            calibrated with held-out images (``calibrate(..., heldout=...)``, ``--heldout``);
            without them the monitor logs a warning once and never alarms.

    Runtime options (see :mod:`surprise_monitor.monitor.runtime`):

        metrics: export Prometheus metrics: ``True`` into the global registry, or a
            ``CollectorRegistry``; ``False`` (default) exports none. With metrics on, two timing
            hooks are added on the model's root module (removed by :meth:`close`).
        metrics_namespace: metric name prefix (default ``surprise_monitor``).
        metrics_labels: constant labels of this monitor's series, e.g. ``{"model": "resnet50"}``
            (needed to put two monitors in one registry under one namespace).
        per_class_metrics: add a ``class`` label to the monitored / flagged / alarmed counters.
        metrics_window: p-values in the sliding window of the windowed alarm rate and the KS
            drift gauge (``surprise_monitor_window_*``).
        on_flag: called with a one-input :class:`MonitorReport` for each input that alarms
            (``report.alarm``); its per-filter flags (``surprising_filters(0)``,
            ``expected_filters(0)``) and beta explain the alarm. A table without a held-out
            null never alarms, so ``on_flag`` is then never called. Exceptions in it are
            counted and logged, never raised.
        alarm_log: keeps each alarm with its input (:class:`~.alarms.AlarmLog`: recent
            alarms, thumbnails, an audit file, explanations on demand); the monitor binds its
            judge to it for the explanations. Errors in it are counted, never raised. The
            caller owns it: ``alarm_log.close()`` after :meth:`close`.
        sample_every: monitor one input in K (counted over calls and threads).
        sample_fraction: monitor a random fraction of the inputs (seeded by ``sample_seed``).
        mode: ``"sync"`` judges inputs on the request path; ``"async"`` returns the plain
            model output at once and judges a copy of the inputs on a worker thread, through a
            queue of ``queue_size`` batches; when it is full, inputs are dropped and counted.
    """

    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable | str | Path,
        *,
        layer: str | None = None,
        surprise_pct: float = 99.9,
        expectation_pct: float = 0.1,
        low_beta_pct: float = 1.0,
        check_fingerprint: bool = True,
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
        strict_input_size: bool = True,
        backend: str = "auto",
        cuda_graphs: bool = False,
        max_graphs: int = 8,
        alarm_rate: float = 0.01,
        metrics: bool | CollectorRegistry = False,
        metrics_namespace: str = DEFAULT_NAMESPACE,
        metrics_labels: Mapping[str, str] | None = None,
        per_class_metrics: bool = False,
        metrics_window: int = 1000,
        on_flag: Callable[[MonitorReport], Any] | None = None,
        alarm_log: AlarmRecorder | None = None,
        sample_every: int = 1,
        sample_fraction: float = 1.0,
        sample_seed: int | None = 0,
        mode: str = "sync",
        queue_size: int = 64,
    ) -> None:
        if not isinstance(table, CalibrationTable):  # exemplars stay on disk until explained
            table = CalibrationTable.load(table, exemplars=False)
        _check_runtime_options(mode, on_flag, queue_size, metrics_window, alarm_log)
        sampler = Sampler(sample_every, sample_fraction, sample_seed)
        self.judge = Judge(
            model, table, layer=layer, surprise_pct=surprise_pct,
            expectation_pct=expectation_pct, low_beta_pct=low_beta_pct,
            check_fingerprint=check_fingerprint, output_to_logits=output_to_logits,
            strict_input_size=strict_input_size, backend=backend, cuda_graphs=cuda_graphs,
            max_graphs=max_graphs, alarm_rate=alarm_rate,
        )  # fmt: skip
        _warn_without_alarms(table)
        self.queue_size = queue_size
        monitor_metrics = None
        try:
            if metrics is not False and metrics is not None:
                registry = metrics if isinstance(metrics, CollectorRegistry) else None
                options = MetricsOptions(
                    registry=registry, namespace=metrics_namespace,
                    labels=metrics_labels or {}, per_class=per_class_metrics,
                    window=metrics_window,
                )  # fmt: skip
                monitor_metrics = MonitorMetrics(table, options, alarm_rate=self.judge.alarm_rate)
            self.request_path = RequestPath(
                self.judge, sampler=sampler, mode=mode, queue_size=queue_size,
                on_flag=on_flag, metrics=monitor_metrics, recorder=alarm_log,
            )  # fmt: skip
            bind = getattr(alarm_log, "bind", None)
            if bind is not None:
                bind(self.judge)
        except BaseException:
            if monitor_metrics is not None:
                monitor_metrics.close()
            self.judge.close()
            raise

    @classmethod
    def from_onnx(
        cls, path: str | Path, table: CalibrationTable | str | Path, **kwargs: Any
    ) -> SurpriseMonitor:
        """Monitor an ONNX model: converted to a torch module
        (:func:`surprise_monitor.monitor.load_onnx`), then
        monitored exactly like one. The table must come from the same conversion
        (``surprise-calibrate --onnx``); ``kwargs`` are the constructor's."""
        from surprise_monitor.monitor.loading.onnx_model import load_onnx

        return cls(load_onnx(path), table, **kwargs)

    # ------------------------------------------------------------ what it holds
    @property
    def model(self) -> nn.Module:
        """The watched model."""
        return self.judge.model

    @property
    def table(self) -> CalibrationTable:
        """The calibration table."""
        return self.judge.table

    @property
    def layer(self) -> str:
        """The monitored layer (the table's)."""
        return self.judge.layer

    @property
    def probe(self) -> GradAMapProbe:
        """The judge's probe (its hook sits on the monitored layer)."""
        return self.judge.probe

    @property
    def surprise_pct(self) -> float:
        """A filter is surprising above this percentile of its class's calibration alphas."""
        return self.judge.surprise_pct

    @property
    def expectation_pct(self) -> float:
        """A filter is expected below this percentile (and above-average mean)."""
        return self.judge.expectation_pct

    @property
    def low_beta_pct(self) -> float:
        """An input has a low beta below this percentile of its class's betas."""
        return self.judge.low_beta_pct

    @property
    def strict_input_size(self) -> bool:
        """Whether inputs of another size than the calibration images are refused."""
        return self.judge.strict_input_size

    @property
    def backend(self) -> str:
        """The kernel backend."""
        return self.judge.backend

    @property
    def mode(self) -> str:
        """``"sync"`` or ``"async"``."""
        return self.request_path.mode

    @property
    def on_flag(self) -> Callable[[MonitorReport], Any] | None:
        """The callback for inputs that alarm, if any."""
        return self.request_path.on_flag

    @property
    def alarm_rate(self) -> float:
        """The nominal false-alarm rate: an input alarms when its p-value is at most this."""
        return self.judge.alarm_rate

    @property
    def alarm_log(self) -> AlarmRecorder | None:
        """What each alarm and its input are handed to, if anything."""
        return self.request_path.recorder

    @property
    def metrics(self) -> MonitorMetrics | None:
        """The Prometheus metrics, or ``None`` when they are off."""
        return self.request_path.metrics

    @property
    def failures(self) -> Counter[str]:
        """Monitoring failures by kind (exception type; ``on_flag:`` for callback errors)."""
        return self.request_path.failures

    @property
    def dropped(self) -> int:
        """Inputs the async mode dropped because its queue was full."""
        return self.request_path.dropped

    @property
    def last_report(self) -> MonitorReport | None:
        """The calling thread's last report: from its own last :meth:`inspect` or call, so
        ``monitor(x)`` then ``monitor.last_report`` is that call's report even while other
        threads call the monitor. In async mode a call makes no report on the caller's thread:
        a thread without one of its own sees the last batch the worker judged (shared by all
        threads; use ``on_flag`` or :meth:`run` to tie reports to calls)."""
        return self.request_path.last_report

    @last_report.setter
    def last_report(self, report: MonitorReport | None) -> None:
        """Replace the calling thread's kept report."""
        self.request_path.last_report = report

    # ------------------------------------------------------------------- calls
    def inspect(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """Monitor a batch ``x`` and return the per-sample :class:`MonitorReport`.

        Each input is judged against ``labels[b]`` when given, else its predicted class.
        Raises on bad input (wrong shape, NaN/Inf, labels out of range).
        """
        report = self.judge(x, labels)
        self.request_path.last_report = report
        return report

    def __call__(self, x: torch.Tensor, labels: Any = None) -> Any:
        """Drop-in for ``model(x)``: returns the model's output (detached); the report is kept
        in :attr:`last_report` (per thread). If monitoring fails, the output is still returned
        and the failure is counted in :attr:`failures` (logged once per kind). If the model
        itself raises, its exception propagates from its one forward pass."""
        return self.run(x, labels).output

    def run(
        self, x: torch.Tensor, labels: Any = None, request_id: str | None = None
    ) -> MonitorResult:
        """Like ``monitor(x)``, with the report of the rows judged on the request path.
        ``request_id`` (e.g. the HTTP request's) is kept with the call's alarms.

        Sampling, ``on_flag``, metrics and the async mode apply; monitoring failures are
        counted, never raised. An exception from the model itself (an input it cannot run)
        propagates, as it would without the monitor: the model runs once, and its inputs are
        counted as skipped with reason ``model_error``.
        """
        return self.request_path.run(x, labels, request_id)

    # ------------------------------------------------------------ explanations
    def explain(
        self, x: torch.Tensor, filter: int | None = None, label: int | None = None,
        n_segments: int = 50, **kw: Any,
    ) -> Explanation:  # fmt: skip
        """Why was ``x`` flagged: the region behind one filter and its training exemplars
        (:func:`surprise_monitor.monitor.explain.explain`); the monitor's :attr:`last_report` is
        left alone."""
        from surprise_monitor.monitor.explain.explanation import explain

        return explain(self.judge, x, filter=filter, label=label, n_segments=n_segments, **kw)

    def fix(self, x: torch.Tensor, label: int, **kw: Any) -> FixResult:
        """Try to fix a misclassified ``x`` by zeroing the superpixels behind its most surprising
        filter (:func:`surprise_monitor.monitor.explain.fix`); :attr:`last_report` is left alone."""
        from surprise_monitor.monitor.explain.fixes import fix

        return fix(self.judge, x, label, **kw)

    # --------------------------------------------------------------- lifecycle
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the async worker has judged every queued input (True), or ``timeout``
        seconds passed (False). Returns True at once in sync mode."""
        return self.request_path.flush(timeout)

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve the metrics registry at ``http://addr:port/metrics`` on a daemon thread until
        :meth:`close`; ``port=0`` picks a free port. Returns the port."""
        return self.request_path.serve_metrics(port, addr)

    def close(self, timeout: float | None = None) -> None:
        """Drain the async queue (waiting at most ``timeout`` seconds; None: until done), stop
        the worker and the metrics server, remove this monitor's metric series and its hooks
        from the model (idempotent)."""
        self.request_path.close(timeout)
        self.judge.close()

    def __enter__(self) -> SurpriseMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_runtime_options(
    mode: str, on_flag: Callable[[MonitorReport], Any] | None, queue_size: int,
    metrics_window: int = 1000, alarm_log: Any = None,
) -> None:  # fmt: skip
    """``ValueError`` / ``TypeError`` for a bad mode, callback, queue size, metrics window or
    alarm log (checked before anything is attached to the model)."""
    check_mode(mode)
    if on_flag is not None and not callable(on_flag):
        raise TypeError("on_flag must be callable")
    for name, value in (("queue_size", queue_size), ("metrics_window", metrics_window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if alarm_log is not None and not callable(getattr(alarm_log, "record", None)):
        raise TypeError("alarm_log must have a record(report, x, request_id) method (AlarmLog)")


def _warn_without_alarms(table: CalibrationTable) -> None:
    """Log once per table when it cannot raise alarms (no held-out null)."""
    if table.alarm is not None and table.alarm.has_null:
        return
    key = id(table)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(
        "surprise monitor: the table has no held-out null, so no input will alarm "
        "(report.alarm is False, report.p_value NaN); calibrate with held-out images "
        "(calibrate(..., heldout=...), surprise-calibrate --heldout DIR)"
    )


_WARNED: set[int] = set()
