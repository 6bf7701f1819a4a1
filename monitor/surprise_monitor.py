"""``SurpriseMonitor``: wraps a CNN and judges each input against the calibration table."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from calibrate.fingerprint import model_fingerprint
from calibrate.table import CalibrationTable
from kernels import (
    LookupTable,
    grad_amap,
    percentile_lookup,
    percentile_rank,
    prepare_lookup_table,
)
from monitor.layers import get_module
from monitor.metrics import DEFAULT_NAMESPACE, MonitorMetrics
from monitor.probe import GradAMapProbe, ProbeResult
from monitor.report import MonitorReport
from monitor.runtime import MODES, AsyncWorker, ForwardTimer, MonitorResult, Sampler, select_rows

log = logging.getLogger(__name__)


class TableMismatchError(ValueError):
    """The calibration table was not made for this model / layer."""


class InvalidInputError(ValueError):
    """An input batch or its labels cannot be monitored (shape, dtype, NaN/Inf, empty, range)."""


def _batch_len(x: Any) -> int:
    """Inputs in a call: the batch size of a ``[B, C, H, W]`` tensor, else 1."""
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim == 4 else 1


def _check_pct(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    return value


class SurpriseMonitor:
    """Watches a CNN at inference time: surprise, expectation and beta per input.

    Args:
        model: the CNN (``nn.Module``) in eval mode; it is not modified, and :meth:`close`
            removes the one forward hook the monitor adds.
        table: a :class:`~calibrate.CalibrationTable` or the path of a saved one.
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

    Runtime options (see :mod:`monitor.metrics` and :mod:`monitor.runtime`):

        metrics: export Prometheus metrics: ``True`` into the global registry, or a
            ``CollectorRegistry``; ``False`` (default) exports none. With metrics on, two timing
            hooks are added on the model's root module (removed by :meth:`close`).
        metrics_namespace: metric name prefix (default ``surprise_monitor``).
        metrics_labels: constant labels of this monitor's series, e.g. ``{"model": "resnet50"}``
            (needed to put two monitors in one registry under one namespace).
        per_class_metrics: add a ``class`` label to the monitored / flagged counters.
        on_flag: called with a one-input :class:`MonitorReport` for each flagged input
            (exceptions in it are counted and logged, never raised).
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
        metrics: bool | CollectorRegistry = False,
        metrics_namespace: str = DEFAULT_NAMESPACE,
        metrics_labels: Mapping[str, str] | None = None,
        per_class_metrics: bool = False,
        on_flag: Callable[[MonitorReport], Any] | None = None,
        sample_every: int = 1,
        sample_fraction: float = 1.0,
        sample_seed: int | None = 0,
        mode: str = "sync",
        queue_size: int = 64,
    ) -> None:
        if not isinstance(table, CalibrationTable):  # exemplars stay on disk until explained
            table = CalibrationTable.load(table, exemplars=False)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self._require_eval(model)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_flag is not None and not callable(on_flag):
            raise TypeError("on_flag must be callable")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self._sampler = Sampler(sample_every, sample_fraction, sample_seed)
        if layer is not None and layer != table.layer:
            raise TableMismatchError(
                f"the table was calibrated at layer {table.layer!r}, not {layer!r}; "
                "calibrate again at that layer"
            )
        get_module(model, table.layer)
        if check_fingerprint and table.model_fingerprint:
            found = model_fingerprint(model)
            if found != table.model_fingerprint:
                raise TableMismatchError(
                    "the table was calibrated on a model with other weights (fingerprint "
                    f"{table.model_fingerprint[:12]}, this model {found[:12]}); calibrate again, "
                    "or pass check_fingerprint=False if the change is deliberate"
                )
        self.model = model
        self.table = table
        self.surprise_pct = _check_pct("surprise_pct", surprise_pct)
        self.expectation_pct = _check_pct("expectation_pct", expectation_pct)
        self.low_beta_pct = _check_pct("low_beta_pct", low_beta_pct)
        self.strict_input_size = strict_input_size
        self.backend = backend
        self.failures: Counter[str] = Counter()
        self.last_report: MonitorReport | None = None
        self.mode = mode
        self.on_flag = on_flag
        self.queue_size = queue_size
        self.dropped = 0  # inputs the async mode dropped because its queue was full
        self.metrics: MonitorMetrics | None = None
        self._timer: ForwardTimer | None = None
        self._worker: AsyncWorker | None = None
        self._metrics_server: Any = None
        self._lock = threading.Lock()
        self._logged_failures: set[str] = set()
        self._tables: dict[torch.device, tuple[LookupTable, dict[str, torch.Tensor]]] = {}
        self._beta_threshold = table.beta_value_at(self.low_beta_pct).float()  # [K]
        self.probe = GradAMapProbe(
            model, table.layer, score=table.score, output_to_logits=output_to_logits
        )
        if table.input_shape:
            try:  # fail fast on a table for another filter or class count
                device = next(iter(model.parameters()), torch.empty(0)).device
                self._check_shapes(
                    self.probe.run(torch.zeros(1, *table.input_shape, device=device))
                )
            except BaseException:
                self.probe.close()
                raise
        try:
            if metrics is not False and metrics is not None:
                registry = metrics if isinstance(metrics, CollectorRegistry) else None
                self.metrics = MonitorMetrics(
                    table, registry=registry, namespace=metrics_namespace,
                    labels=metrics_labels, per_class=per_class_metrics,
                )  # fmt: skip
                self._timer = ForwardTimer(model)
            if mode == "async":
                self._worker = AsyncWorker(
                    self._handle_queued, queue_size,
                    on_depth=self.metrics.queue_depth if self.metrics else None,
                )  # fmt: skip
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_onnx(
        cls, path: str | Path, table: CalibrationTable | str | Path, **kwargs: Any
    ) -> SurpriseMonitor:
        """Monitor an ONNX model: converted to a torch module (:func:`monitor.load_onnx`), then
        monitored exactly like one. The table must come from the same conversion
        (``surprise-calibrate --onnx``); ``kwargs`` are the constructor's."""
        from monitor.onnx_model import load_onnx

        return cls(load_onnx(path), table, **kwargs)

    # ------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = None) -> None:
        """Drain the async queue (waiting at most ``timeout`` seconds; None: until done), stop
        the worker and the metrics server, remove this monitor's metric series and its hooks
        from the model (idempotent)."""
        if self._worker is not None:
            self._worker.close(timeout)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.metrics is not None:
            self.metrics.close()
        if self._timer is not None:
            self._timer.close()
        self.probe.close()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the async worker has judged every queued input (True), or ``timeout``
        seconds passed (False). Returns True at once in sync mode."""
        return self._worker.flush(timeout) if self._worker is not None else True

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve the metrics registry at ``http://addr:port/metrics`` on a daemon thread until
        :meth:`close`; ``port=0`` picks a free port. Returns the port."""
        if self.metrics is None:
            raise RuntimeError("metrics are off; construct the monitor with metrics=True")
        if self._metrics_server is not None:
            raise RuntimeError("metrics are already served")
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=addr, registry=self.metrics.registry)
        self._metrics_server = server
        return int(server.server_port)

    def __enter__(self) -> SurpriseMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def layer(self) -> str:
        return self.table.layer

    # ----------------------------------------------------------- validation
    @staticmethod
    def _require_eval(model: nn.Module) -> None:
        if model.training:
            raise ValueError(
                "the model is in training mode; call model.eval() before monitoring it "
                "(batch statistics would couple the samples of a batch)"
            )

    def _check_shapes(self, res: ProbeResult) -> None:
        n, k = res.activation.shape[1], res.logits.shape[1]
        if n != self.table.num_filters:
            raise TableMismatchError(
                f"layer {self.layer!r} has {n} filters but the table has {self.table.num_filters}"
            )
        if k != self.table.num_classes:
            raise TableMismatchError(
                f"the model has {k} classes but the table has {self.table.num_classes}"
            )

    def _validate_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise InvalidInputError(
                f"input must be a [B, C, H, W] batch, got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InvalidInputError("input batch is empty")
        if not x.dtype.is_floating_point:
            raise InvalidInputError(f"input must be floating point, got {x.dtype}")
        expect = self.table.input_shape
        if expect:
            if x.shape[1] != expect[0]:
                raise InvalidInputError(
                    f"input has {x.shape[1]} channels; the table was calibrated on {expect[0]}"
                )
            if self.strict_input_size and tuple(x.shape[2:]) != tuple(expect[1:]):
                raise InvalidInputError(
                    f"input size {tuple(x.shape[2:])} differs from the calibration size "
                    f"{tuple(expect[1:])} (alpha depends on resolution; resize the input, or "
                    "pass strict_input_size=False)"
                )
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
            raise InvalidInputError(f"input has NaN or Inf values (batch rows {rows[:10]})")
        return x

    def _validate_labels(self, labels: Any, batch: int) -> torch.Tensor | None:
        if labels is None:
            return None
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.view(1)
        if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InvalidInputError(
                f"labels must be {batch} integers, got {tuple(labels.shape)} {labels.dtype}"
            )
        k = self.table.num_classes
        if bool(((labels < 0) | (labels >= k)).any()):
            raise InvalidInputError(f"labels must lie in [0, {k}), got {labels.tolist()}")
        return labels.long()

    # ----------------------------------------------------------- inspection
    def _tables_for(self, device: torch.device) -> tuple[LookupTable, dict[str, torch.Tensor]]:
        with self._lock:
            if device not in self._tables:
                t = self.table
                lookup = prepare_lookup_table(
                    t, surprise_pct=self.surprise_pct,
                    expectation_pct=self.expectation_pct, device=device,
                )  # fmt: skip
                extra = {
                    "beta_quantiles": t.beta_quantiles.to(device, torch.float32),
                    "beta_levels": t.beta_levels.to(device, torch.float32),
                    "beta_threshold": self._beta_threshold.to(device),
                    "calibrated": (t.counts > 0).to(device),
                }
                self._tables[device] = (lookup, extra)
            return self._tables[device]

    def _report(self, res: ProbeResult, labels_given: bool) -> MonitorReport:
        self._check_shapes(res)
        alpha = grad_amap(res.activation, res.gradient, backend=self.backend)
        lookup, extra = self._tables_for(alpha.device)
        cls = res.classes.to(alpha.device)
        found = percentile_lookup(alpha, cls, lookup, backend=self.backend)
        calibrated = extra["calibrated"][cls]
        beta_pct = percentile_rank(found.beta, extra["beta_quantiles"][cls], extra["beta_levels"])
        low_beta = (found.beta < extra["beta_threshold"][cls]) & calibrated
        return MonitorReport(
            logits=res.logits.float().cpu(),
            classes=cls.cpu(),
            labels_given=labels_given,
            alpha=alpha.cpu(),
            mu=lookup.mean[cls].cpu(),
            percentile=found.percentile.cpu(),
            surprise=(found.surprise & calibrated[:, None]).cpu(),
            expectation=(found.expectation & calibrated[:, None]).cpu(),
            beta=found.beta.cpu(),
            beta_percentile=beta_pct.cpu(),
            low_beta=low_beta.cpu(),
            calibrated=calibrated.cpu(),
            layer=self.layer,
            class_names=tuple(self.table.class_names),
        )

    def _run(self, x: Any, labels: Any, sink: list) -> MonitorReport:
        self._require_eval(self.model)
        x = self._validate_input(x)
        labels = self._validate_labels(labels, x.shape[0])
        res = self.probe.run(x, labels)
        sink.append(res.output)
        report = self._report(res, labels_given=labels is not None)
        self.last_report = report
        return report

    def inspect(self, x: torch.Tensor, labels: Any = None) -> MonitorReport:
        """Monitor a batch ``x`` and return the per-sample :class:`MonitorReport`.

        Each input is judged against ``labels[b]`` when given, else its predicted class.
        Raises on bad input (wrong shape, NaN/Inf, labels out of range).
        """
        return self._run(x, labels, [])

    def __call__(self, x: torch.Tensor, labels: Any = None) -> Any:
        """Drop-in for ``model(x)``: returns the model's output (detached); the report is kept
        in :attr:`last_report`. If monitoring fails, the output is still returned and the
        failure is counted in :attr:`failures` (logged once per kind)."""
        return self.run(x, labels).output

    def run(self, x: torch.Tensor, labels: Any = None) -> MonitorResult:
        """Like ``monitor(x)``, with the report of the rows judged on the request path.

        Sampling, ``on_flag``, metrics and the async mode apply; monitoring failures are
        counted, never raised. An exception from the model itself (an input it cannot run)
        propagates, as it would without the monitor.
        """
        start = time.perf_counter()
        n = _batch_len(x)
        take = self._sampler.select(n)
        k = int(take.sum())
        if self.metrics is not None:
            self.metrics.inputs_seen(n)
            self.metrics.skipped("sampled_out", n - k)
        with self._forward_time() as forward:
            if self.mode == "async":
                result = MonitorResult(self._plain(x), None, torch.zeros(0, dtype=torch.long))
                if k:
                    self._enqueue(x, labels, take, k)
            elif k == n:
                result = self._judge_all(x, labels, n)
            else:
                result = self._judge_some(x, labels, take, k)
        if self.metrics is not None:
            self.metrics.added_latency(time.perf_counter() - start - forward[0])
        return result

    # ------------------------------------------------------- request path
    @contextmanager
    def _forward_time(self) -> Iterator[list[float]]:
        if self._timer is None:
            yield [0.0]
        else:
            with self._timer.measure() as box:
                yield box

    def _plain(self, x: Any) -> Any:
        with torch.no_grad():
            return self.model(x)

    def _judge_all(self, x: Any, labels: Any, n: int) -> MonitorResult:
        sink: list = []
        rows = torch.arange(n)
        report = self._judge(lambda: self._run(x, labels, sink), n, rows)
        if report is not None:
            return MonitorResult(sink[0], report, rows)
        return MonitorResult(sink[0] if sink else self._plain(x), None, rows[:0])

    def _judge_some(self, x: Any, labels: Any, take: torch.Tensor, k: int) -> MonitorResult:
        output = self._plain(x)
        rows = torch.nonzero(take).flatten()
        if k == 0:
            return MonitorResult(output, None, rows)
        report = self._judge(lambda: self._run(x[rows], _rows_of(labels, rows), []), k, rows)
        return MonitorResult(output, report, rows if report is not None else rows[:0])

    def _judge(
        self, run: Callable[[], MonitorReport], k: int, rows: torch.Tensor
    ) -> MonitorReport | None:
        started = time.perf_counter()
        try:
            report = run()
        except Exception as exc:  # fail open: never break the inference being watched
            self._count_failure(exc, k)
            return None
        if self.metrics is not None:
            self.metrics.inspect_duration(time.perf_counter() - started)
            self.metrics.observe(report)
        self._notify(report)
        return report

    def _notify(self, report: MonitorReport) -> None:
        if self.on_flag is None:
            return
        for j in torch.nonzero(report.flagged).flatten().tolist():
            try:
                self.on_flag(select_rows(report, [j]))
            except Exception as exc:  # a broken callback must not break inference either
                self._count_failure(exc, 0, prefix="on_flag:")

    # ---------------------------------------------------------- async mode
    def _enqueue(self, x: Any, labels: Any, take: torch.Tensor, k: int) -> None:
        try:
            rows = torch.nonzero(take).flatten()
            sub = self._validate_input(x if k == _batch_len(x) else x[rows])
            with torch.inference_mode(False):  # a copy the caller cannot change afterwards
                copy = sub.detach().clone()
                lab = _rows_of(labels, rows)
                lab = lab.clone() if isinstance(lab, torch.Tensor) else lab
        except Exception as exc:
            self._count_failure(exc, k)
            return
        assert self._worker is not None
        if not self._worker.submit((copy, lab, rows)):
            if self.metrics is not None:
                self.metrics.skipped("queue_full", k)
            with self._lock:
                self.dropped += k

    def _handle_queued(self, item: tuple[torch.Tensor, Any, torch.Tensor]) -> None:
        x, labels, rows = item
        self._judge(lambda: self._run(x, labels, []), int(x.shape[0]), rows)

    # ------------------------------------------------------------ failures
    def _count_failure(self, exc: Exception, rows: int = 0, prefix: str = "") -> None:
        kind = prefix + type(exc).__name__
        with self._lock:
            self.failures[kind] += 1
            first = kind not in self._logged_failures
            self._logged_failures.add(kind)
        if self.metrics is not None:
            self.metrics.failure(kind)
            self.metrics.skipped("failed", rows)
        if first:
            log.warning(
                "surprise monitor failed (%s: %s); the model's output is returned", kind, exc
            )

    # -------------------------------------------------------- explanations
    def explain(
        self, x: torch.Tensor, filter: int | None = None, label: int | None = None,
        n_segments: int = 50, **kw: Any,
    ) -> Any:  # fmt: skip
        """Why was ``x`` flagged: the region behind one filter and its training exemplars
        (:func:`monitor.explain.explain`; returns an :class:`~monitor.explain.Explanation`)."""
        from monitor.explain import explain

        return explain(self, x, filter=filter, label=label, n_segments=n_segments, **kw)

    def fix(self, x: torch.Tensor, label: int, **kw: Any) -> Any:
        """Try to fix a misclassified ``x`` by zeroing the superpixels behind its most
        surprising filter (:func:`monitor.fix.fix`; returns a :class:`~monitor.fix.FixResult`)."""
        from monitor.fix import fix

        return fix(self, x, label, **kw)


def _rows_of(labels: Any, rows: torch.Tensor) -> Any:
    """The labels of the given batch rows (``None`` stays ``None``)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    return labels.view(1)[rows] if labels.ndim == 0 else labels[rows]
