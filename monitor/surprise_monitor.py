"""``SurpriseMonitor``: the public facade. It wraps a CNN, has a
:class:`~surprise_monitor.monitor.judge.Judge` judge its inputs against the calibration table, and
puts the request path (:class:`~surprise_monitor.monitor.runtime.RequestPath`: sampling, async mode,
fail-open, callbacks, metrics) around it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from surprise_monitor.monitor.judge import JUDGE_RENAMES, Judge, option_group
from surprise_monitor.monitor.options import (
    Execution,
    MetricsOptions,
    Sampling,
    Thresholds,
    renamed_keywords,
)
from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.runtime.metrics import MonitorMetrics
from surprise_monitor.monitor.runtime.request_path import (
    AlarmRecorder,
    MonitorResult,
    RequestIds,
    RequestPath,
    check_callbacks,
)
from surprise_monitor.monitor.table import CalibrationTable
from surprise_monitor.monitor.table_file import TableError

if TYPE_CHECKING:
    from surprise_monitor.monitor.explain.explanation import Explanation
    from surprise_monitor.monitor.explain.fixes import FixResult


log = logging.getLogger(__name__)


#: The keywords of the 0.1 API, refused with their new spelling.
RENAMES: dict[str, str] = {
    **JUDGE_RENAMES,
    "on_flag": "on_alarm= (it is called for each input that alarms)",
    **{k: f"metrics=MetricsOptions({new}=...)" for k, new in (
        ("metrics_namespace", "namespace"), ("metrics_labels", "labels"),
        ("per_class_metrics", "per_class"), ("metrics_window", "window"))},
    **{k: f"sampling=Sampling({new}=...)" for k, new in (
        ("sample_every", "every"), ("sample_fraction", "fraction"), ("sample_seed", "seed"),
        ("mode", "mode"), ("queue_size", "queue_size"))},
}  # fmt: skip


class SurpriseMonitor:
    """Watches a CNN at inference time: surprise, expectation and beta per input, and a
    per-input alarm.

    The options come in groups, each documented field by field where it is declared
    (:mod:`surprise_monitor.monitor.options`); ``None`` means a group's defaults. An option
    keyword of 0.1 (``alarm_rate=``, ``mode=``, ...) is refused with a ``TypeError`` naming its
    new spelling.

    Args:
        model: the CNN (``nn.Module``) in eval mode, float32, float16 or bfloat16 (its inputs
            are its own dtype); it is not modified, and :meth:`close` removes the forward hooks
            the monitor adds (the monitored layer's and the alarm's profile layers'). While
            watched it can still be deep-copied, pickled and ``torch.save``-d: a copy carries
            inert hooks (``InertHook``) and is not watched.
        table: a :class:`~surprise_monitor.monitor.table.CalibrationTable` or the path of a saved
            one. The monitored layer is the table's (:attr:`layer`).
        thresholds: :class:`~surprise_monitor.monitor.options.Thresholds`, what counts as
            surprising, expected, low beta and an alarm. An input alarms (``report.alarm``)
            only with a table calibrated with held-out images (``calibrate(..., heldout=...)``,
            ``--heldout``); without them the monitor logs a warning once and never alarms.
        execution: :class:`~surprise_monitor.monitor.options.Execution`, how the judge runs
            (backend, CUDA graphs: :mod:`surprise_monitor.monitor.cuda_graphs`, host checks)
            and what it refuses.
        sampling: :class:`~surprise_monitor.monitor.options.Sampling`, which inputs are judged
            and on which thread (see :mod:`surprise_monitor.monitor.runtime`).
        metrics: export Prometheus metrics: ``True`` into the global registry, a
            ``CollectorRegistry``, or :class:`~surprise_monitor.monitor.options.MetricsOptions`;
            ``False`` (default) exports none. With metrics on, two timing hooks are added on the
            model's root module (removed by :meth:`close`).
        on_alarm: called with a one-input :class:`MonitorReport` for each input that alarms
            (``report.alarm``); its per-filter flags (``surprising_filters(0)``,
            ``expected_filters(0)``) and beta explain the alarm. Exceptions in it are counted
            and logged, never raised.
        alarm_log: keeps each alarm with its input (:class:`~.alarms.AlarmLog`: recent
            alarms, thumbnails, an audit file, explanations on demand); the monitor binds its
            judge to it for the explanations. Errors in it are counted, never raised. The
            caller owns it: ``alarm_log.close()`` after :meth:`close`.
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
        table_key: the secret key the table must be signed with (its bytes, or the path of a
            key file: :func:`~surprise_monitor.monitor.table_key.load_key`). A table path is
            loaded with it (a :class:`~.table_file.TableError` for an unsigned table or one
            changed since it was signed); a loaded table must have been loaded with the same
            key (``CalibrationTable.load(path, key=...)``). ``None``: the table is not
            authenticated.
    """

    @renamed_keywords(RENAMES)
    def __init__(
        self,
        model: nn.Module,
        table: CalibrationTable | str | Path,
        *,
        thresholds: Thresholds | None = None,
        execution: Execution | None = None,
        sampling: Sampling | None = None,
        metrics: bool | CollectorRegistry | MetricsOptions = False,
        on_alarm: Callable[[MonitorReport], Any] | None = None,
        alarm_log: AlarmRecorder | None = None,
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
        table_key: bytes | str | Path | None = None,
    ) -> None:
        if not isinstance(table, CalibrationTable):  # exemplars stay on disk until explained
            table = CalibrationTable.load(table, exemplars=False, key=table_key)
        elif table_key is not None and not table.verified_with(table_key):
            raise TableError(
                "the table was not loaded with this table_key, so its signature is unchecked: "
                "pass the path, or load the table with key=..."
            )
        # checked before anything is attached to the model
        check_callbacks(on_alarm, alarm_log)
        sampling = option_group(sampling, Sampling, "sampling")
        metrics_options = MetricsOptions.of(metrics)
        self.judge = Judge(
            model, table, thresholds=thresholds, execution=execution,
            output_to_logits=output_to_logits,
        )  # fmt: skip
        _warn_without_alarms(table)
        monitor_metrics = None
        try:
            if metrics_options is not None:
                rate = self.judge.thresholds.alarm_rate
                monitor_metrics = MonitorMetrics(table, metrics_options, alarm_rate=rate)
            self.request_path = RequestPath(
                self.judge, sampling, on_alarm=on_alarm, metrics=monitor_metrics,
                recorder=alarm_log,
            )  # fmt: skip
            bind = getattr(alarm_log, "bind", None)
            if bind is not None:
                bind(self.judge)
        except BaseException:
            if monitor_metrics is not None:
                monitor_metrics.close()
            self.judge.close()
            raise
        # What it holds (read them, do not assign them: the judge and request path own them).
        self.model: nn.Module = model  #: the watched model
        self.table: CalibrationTable = table  #: the calibration table
        self.layer: str = table.layer  #: the monitored layer (the table's)
        self.thresholds: Thresholds = self.judge.thresholds  #: flags and the alarm
        self.execution: Execution = self.judge.execution  #: how the judge runs, what it refuses
        self.sampling: Sampling = sampling  #: which inputs are judged, on which thread
        self.metrics: MonitorMetrics | None = monitor_metrics  #: None when metrics are off
        self.alarm_log: AlarmRecorder | None = alarm_log  #: the caller's; it closes it

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

    # ------------------------------------------- what it observed (the request path's state)
    @property
    def failures(self) -> Counter[str]:
        """Monitoring failures by kind (exception type; ``on_alarm:`` for callback errors)."""
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
        threads; use ``on_alarm`` or :meth:`run` to tie reports to calls)."""
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
        self, x: torch.Tensor, labels: Any = None, request_id: RequestIds = None
    ) -> MonitorResult:
        """Like ``monitor(x)``, with the report of the rows judged on the request path.
        ``request_id`` (e.g. the HTTP request's) is kept with the call's alarms; a sequence of
        one id per input when the batch joins several requests.

        Sampling, ``on_alarm``, metrics and the async mode apply; monitoring failures are
        counted, never raised. An exception from the model itself (an input it cannot run)
        propagates, as it would without the monitor: the model runs once, and its inputs are
        counted as skipped with reason ``model_error``.
        """
        return self.request_path.run(x, labels, request_id)

    # ------------------------------------------------------------ explanations
    def explain(
        self, x: torch.Tensor, label: int | None = None, *, filter: int | None = None,
        n_segments: int = 50, **kw: Any,
    ) -> Explanation:  # fmt: skip
        """Why was ``x`` flagged: the region behind one filter (default: the most surprising)
        judged against ``label`` (default: the prediction), and its training exemplars
        (:func:`surprise_monitor.monitor.explain.explain`); the monitor's :attr:`last_report` is
        left alone."""
        from surprise_monitor.monitor.explain.explanation import explain

        return explain(self.judge, x, label, filter=filter, n_segments=n_segments, **kw)

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
