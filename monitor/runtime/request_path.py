"""The request path: what happens around the judge when a served model is called.

:class:`RequestPath` runs the model for every call and has the
:class:`~surprise_monitor.monitor.judge.Judge` judge the inputs it samples: on the calling thread
(``mode="sync"``, from the same forward pass when every input is sampled) or on a worker thread
(``mode="async"``, a copy of the inputs, dropped and counted when the queue is full; the worker
joins queued copies that fit together into one judge call of at most ``sampling.judge_batch``
inputs, in queue order, each alarm still recorded with its own request's id). It never lets
monitoring break the call (fail-open): a failure is counted (``failures``, the metrics) and logged
once per kind, and the model's output is still returned. It calls ``on_alarm`` for each input
that alarms (``report.alarm``; the per-filter flags that explain it stay in the report), hands each
alarm and its input to the alarm recorder (e.g.
:class:`surprise_monitor.monitor.alarms.AlarmLog`), feeds the Prometheus metrics and keeps the last
report. Its options are one :class:`~surprise_monitor.monitor.options.Sampling`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple, Protocol

import torch

from surprise_monitor.monitor.judge import Judge, NonFiniteInputError, option_group
from surprise_monitor.monitor.options import Sampling
from surprise_monitor.monitor.probe.grad_amap_probe import ModelRaised
from surprise_monitor.monitor.report import MonitorReport
from surprise_monitor.monitor.runtime.metrics import MonitorMetrics, failure_kind
from surprise_monitor.monitor.runtime.sampling import Sampler
from surprise_monitor.monitor.runtime.timing import ForwardTime, ForwardTimer
from surprise_monitor.monitor.runtime.worker import AsyncWorker

log = logging.getLogger(__name__)

_NOT_RUN = object()  # the model's output before the model ran


@dataclass(frozen=True)
class MonitorResult:
    """What one monitored call produced.

    ``output`` is the model's output for the whole batch. ``report`` covers the batch rows in
    ``rows`` (``report.sample(j)`` is row ``rows[j]``); it is ``None`` when no row was judged on
    the request path (all sampled out, monitoring failed, or async mode).
    """

    output: Any
    report: MonitorReport | None
    rows: torch.Tensor  # [R] int64 batch indices the report covers (empty when report is None)


class Queued(NamedTuple):
    """A copy of one call's sampled inputs waiting for the async worker."""

    x: torch.Tensor  # [k, C, H, W]
    labels: torch.Tensor | None  # [k] int64 class ids, checked, or None
    request_ids: tuple[str | None, ...]  # [k]: each input's request


def joinable(a: Queued, b: Queued) -> bool:
    """Whether two queued copies can be judged in one batch: the same per-input shape, dtype
    and device, and labels for both or for neither."""
    return (
        a.x.shape[1:] == b.x.shape[1:]
        and a.x.dtype == b.x.dtype
        and a.x.device == b.x.device
        and (a.labels is None) == (b.labels is None)
    )


class AlarmRecorder(Protocol):
    """What the request path hands each alarm to (:class:`surprise_monitor.monitor.alarms.AlarmLog`
    is one)."""

    def record(self, report: MonitorReport, x: torch.Tensor, request_id: str | None) -> Any:
        """Keep one alarm: its one-input ``report``, its input ``x`` ``[C, H, W]`` (the
        normalised tensor the model saw) and the request it came with."""


def check_callbacks(on_alarm: Any, recorder: Any) -> None:
    """``TypeError`` for an ``on_alarm`` that is not callable or an alarm recorder without a
    ``record`` method (checked before anything is attached to the model)."""
    if on_alarm is not None and not callable(on_alarm):
        raise TypeError("on_alarm must be callable")
    if recorder is not None and not callable(getattr(recorder, "record", None)):
        raise TypeError("alarm_log must have a record(report, x, request_id) method (AlarmLog)")


def batch_len(x: Any) -> int:
    """Inputs in a call: the batch size of a ``[B, C, H, W]`` tensor, else 1."""
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim == 4 else 1


RequestIds = str | Sequence[str | None] | None


def ids_per_row(request_id: RequestIds, n: int) -> list[str | None]:
    """One request id per input: ``request_id`` repeated, or a sequence of ``n`` ids (inputs
    joined from several requests, e.g. by a serving engine's batcher); ``ValueError`` for a
    sequence of another length."""
    if request_id is None or isinstance(request_id, str):
        return [request_id] * n
    ids = [None if i is None else str(i) for i in request_id]
    if len(ids) != n:
        raise ValueError(f"request_id has {len(ids)} ids for {n} inputs (one per input)")
    return ids


def rows_of(labels: Any, rows: torch.Tensor) -> Any:
    """The labels of the given batch rows (``None`` stays ``None``)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    return labels.view(1)[rows] if labels.ndim == 0 else labels[rows]


class RequestPath:
    """Sampling, the async worker, fail-open counting, ``on_alarm`` and metrics around a judge.

    Args:
        judge: judges the sampled inputs (its model also answers the unsampled ones).
        sampling: which inputs to judge, on which thread, through how long a queue
            (:class:`~surprise_monitor.monitor.options.Sampling`; ``None``: its defaults).
        on_alarm: called with a one-input report per input that alarms (errors counted, not
            raised). A table without a held-out null never alarms, so it is never called.
        recorder: given each alarm with its input (errors counted as ``callback`` failures).
        metrics: the monitor's metrics, or ``None``; closed by :meth:`close`. With metrics,
            two timing hooks are added on the model's root module.
    """

    def __init__(
        self,
        judge: Judge,
        sampling: Sampling | None = None,
        *,
        on_alarm: Callable[[MonitorReport], Any] | None = None,
        metrics: MonitorMetrics | None = None,
        recorder: AlarmRecorder | None = None,
    ) -> None:
        check_callbacks(on_alarm, recorder)
        self.judge = judge
        self.sampling = option_group(sampling, Sampling, "sampling")
        self.sampler = Sampler(self.sampling)
        self.on_alarm = on_alarm
        self.metrics = metrics
        self.recorder = recorder
        self.failures: Counter[str] = Counter()
        self.dropped = 0  # inputs the async mode dropped because its queue was full
        self._local = threading.local()  # the calling thread's last report
        self._worker_report: MonitorReport | None = None  # async mode: the worker's last one
        self._lock = threading.Lock()
        self._logged_failures: set[str] = set()
        self._metrics_server: Any = None
        self._timer = ForwardTimer(judge.model) if metrics is not None else None
        self._worker: AsyncWorker | None = None
        self._worker_thread: threading.Thread | None = None
        if self.mode == "async":
            on_depth = metrics.queue_depth if metrics is not None else None
            size = self.sampling.queue_size
            self._worker = AsyncWorker(
                self._handle_queued, size, on_depth=on_depth, take=self._joined
            )
            self._worker_thread = self._worker.thread

    @property
    def mode(self) -> str:
        """``"sync"`` or ``"async"`` (``sampling.mode``)."""
        return self.sampling.mode

    # ------------------------------------------------------------- last report
    @property
    def last_report(self) -> MonitorReport | None:
        """The last report made for the calling thread (by its own calls and ``inspect``), so
        ``monitor(x)`` then ``last_report`` is always that call's report, whatever other
        threads do. In async mode, where calls make no report on the caller's thread, a thread
        without a report of its own sees the last batch the worker judged (shared)."""
        mine = getattr(self._local, "report", None)
        if mine is None and self.mode == "async":
            return self._worker_report
        return mine

    @last_report.setter
    def last_report(self, report: MonitorReport | None) -> None:
        """Keep ``report`` as the calling thread's last report."""
        self._local.report = report

    # ------------------------------------------------------------------ calls
    def run(self, x: Any, labels: Any = None, request_id: RequestIds = None) -> MonitorResult:
        """The model's output for ``x`` and the report of the rows judged on this thread.

        Every input is counted once as monitored or skipped (``sampled_out``, ``queue_full``,
        ``failed``, or ``model_error`` when the model itself raises: its exception propagates,
        from the model's one forward pass). ``request_id`` (one id, or one per input) goes with
        the call's alarms to the recorder."""
        start = time.perf_counter()
        n = batch_len(x)
        request_ids = ids_per_row(request_id, n)
        take = self.sampler.select(n)
        k = int(take.sum())
        if self.metrics is not None:
            self.metrics.inputs_seen(n)
            self.metrics.skipped("sampled_out", n - k)
        with self._forward_time() as forward:
            if self.mode == "async":
                output = self._plain(x, k)
                result = MonitorResult(output, None, torch.zeros(0, dtype=torch.long))
                if k:
                    self._enqueue(x, labels, take, k, request_ids)
            elif k == n:
                result = self._judge_all(x, labels, n, request_ids)
            else:
                result = self._judge_some(x, labels, take, k, request_ids)
        if self.metrics is not None:
            self.metrics.added_latency(time.perf_counter() - start - forward.seconds)
        return result

    def _plain(self, x: Any, pending: int) -> Any:
        """The model's output for ``x``, unmonitored; if the model raises, the ``pending``
        inputs not yet counted are counted as ``model_error`` skips and the error propagates."""
        try:
            with torch.no_grad():
                return self.judge.model(x)
        except Exception:
            self._count_model_error(pending)
            raise

    @contextmanager
    def _forward_time(self) -> Iterator[ForwardTime]:
        """Measure the model's forward time in the block (zero without metrics)."""
        if self._timer is None:
            yield ForwardTime()
        else:
            with self._timer.measure() as spent:
                yield spent

    def _judge_all(
        self, x: Any, labels: Any, n: int, request_ids: list[str | None]
    ) -> MonitorResult:
        """Every row sampled: judge the batch from the forward pass that answers it."""
        rows = torch.arange(n)
        output, report, judged = self._judge(x, labels, n, request_ids=request_ids)
        if output is _NOT_RUN:  # monitoring failed before the model ran: answer plainly
            output = self._plain(x, 0)
        return MonitorResult(output, report, rows[judged] if report is not None else rows[:0])

    def _judge_some(
        self, x: Any, labels: Any, take: torch.Tensor, k: int, request_ids: list[str | None]
    ) -> MonitorResult:
        """Some rows sampled: answer the batch, then judge the ``k`` sampled rows."""
        output = self._plain(x, k)
        rows = torch.nonzero(take).flatten()
        if k == 0:
            return MonitorResult(output, None, rows)
        ids = [request_ids[r] for r in rows.tolist()]
        _, report, judged = self._judge(x, labels, k, rows=rows, request_ids=ids)
        return MonitorResult(output, report, rows[judged] if report is not None else rows[:0])

    def _judge(
        self, x: Any, labels: Any, k: int, rows: torch.Tensor | None = None,
        request_ids: Sequence[str | None] = (),
    ) -> tuple[Any, MonitorReport | None, torch.Tensor]:  # fmt: skip
        """Judge ``k`` inputs (the ``rows`` of ``x`` when given), failing open: the model's
        output (``_NOT_RUN`` if the model did not get to run), the report, or ``None`` after a
        counted failure (all ``k`` inputs counted ``failed``), and which of the ``k`` inputs the
        report covers (all of them, but for inputs holding NaN / Inf: those are counted
        ``failed`` and the others judged without them). When the model itself raises, the ``k``
        inputs are counted as ``model_error`` skips and the model's exception propagates (the
        model is not run again). ``request_ids``: the request of each of the ``k`` inputs, for
        the recorder."""
        started = time.perf_counter()
        output: Any = _NOT_RUN
        error: Exception | None = None
        try:
            if rows is not None:
                x, labels = x[rows], rows_of(labels, rows)
            batch = self.judge.validate(x, labels)
            step = self.judge.step(batch)
            output = step.output
            report = self.judge.assemble(step, batch.labels_given)
        except ModelRaised as exc:
            self._count_model_error(k)
            error = exc.error
        except NonFiniteInputError as exc:  # judge the others without the NaN / Inf inputs
            return output, *self._judge_finite(x, labels, k, exc, request_ids)
        except Exception as exc:  # fail open: never break the inference being watched
            self._count_failure(exc, k)
            return output, None, torch.arange(0)
        if error is not None:
            raise error  # outside the handler: the model's error as it was raised
        if threading.current_thread() is self._worker_thread:
            self._worker_report = report
        else:
            self._local.report = report
        if self.metrics is not None:
            self.metrics.inspect_duration(time.perf_counter() - started)
            self.metrics.observe(report)
        self._notify(report, x, request_ids)
        return output, report, torch.arange(k)

    def _judge_finite(
        self, x: Any, labels: Any, k: int, exc: NonFiniteInputError,
        request_ids: Sequence[str | None],
    ) -> tuple[MonitorReport | None, torch.Tensor]:  # fmt: skip
        """After ``exc`` named the inputs holding NaN / Inf: count those ``failed``, judge the
        others (one NaN input does not leave its neighbours unjudged). The report and which of
        the ``k`` inputs it covers."""
        bad = set(exc.rows) & set(range(k))
        good = torch.tensor([i for i in range(k) if i not in bad], dtype=torch.long)
        if not bad or not len(good):  # rows not named, or nothing else to judge
            self._count_failure(exc, k)
            return None, torch.arange(0)
        self._count_failure(exc, len(bad))
        ids = [request_ids[i] if i < len(request_ids) else None for i in good.tolist()]
        _, report, judged = self._judge(x, labels, len(good), rows=good.to(x.device),
                                        request_ids=ids)  # fmt: skip
        return report, good[judged]

    def _notify(self, report: MonitorReport, x: Any, request_ids: Sequence[str | None]) -> None:
        """Call ``on_alarm`` with each alarming input's one-input report, and hand it with its
        input and its request's id (``request_ids[j]`` for row ``j``; ``None`` past their end)
        to the recorder (failures of either are counted, never raised)."""
        if self.on_alarm is None and self.recorder is None:
            return
        for j in torch.nonzero(report.alarm).flatten().tolist():
            one = report.select([j])
            if self.on_alarm is not None:
                try:
                    self.on_alarm(one)
                except Exception as exc:  # a broken callback must not break inference either
                    self._count_failure(exc, 0, prefix="on_alarm:")
            if self.recorder is not None:
                try:
                    request_id = request_ids[j] if j < len(request_ids) else None
                    self.recorder.record(one, x[j], request_id)
                except Exception as exc:
                    self._count_failure(exc, 0, prefix="recorder:")

    # ------------------------------------------------------------- async mode
    def _enqueue(
        self, x: Any, labels: Any, take: torch.Tensor, k: int, request_ids: list[str | None]
    ) -> None:
        """Queue a copy of the ``k`` sampled rows for the worker (counted when dropped). The
        input and labels are checked here, as far as the judge checks them on the host, so that
        a bad call fails alone rather than the batch the worker joins it into; inputs holding
        NaN / Inf are counted ``failed`` and the others queued."""
        try:
            rows = torch.nonzero(take).flatten()
            sub = x if k == batch_len(x) else x[rows]
            try:
                sub = self.judge.check_input(sub, values=self.judge.checks_on_host(sub))
            except NonFiniteInputError as exc:
                bad = set(exc.rows)
                keep = [i for i in range(k) if i not in bad]
                if not keep or len(keep) == k:
                    raise
                self._count_failure(exc, k - len(keep))
                rows, sub, k = rows[keep], sub[keep], len(keep)
            lab = rows_of(labels, rows)
            if lab is not None:
                lab = self.judge.check_labels(lab, k, values=self.judge.checks_on_host(lab))
            with torch.inference_mode(False):  # a copy the caller cannot change afterwards
                copy = sub.detach().clone()
                lab = lab.clone() if lab is not None else None
        except Exception as exc:
            self._count_failure(exc, k)
            return
        assert self._worker is not None
        ids = tuple(request_ids[r] for r in rows.tolist())
        if not self._worker.submit(Queued(copy, lab, ids)):
            if self.metrics is not None:
                self.metrics.skipped("queue_full", k)
            with self._lock:
                self.dropped += k

    def _joined(self, queued: Sequence[Queued]) -> int:
        """How many queued copies the worker judges in its next call: the first, and those after
        it that can join it (:func:`joinable`) while the inputs stay within
        ``sampling.judge_batch`` (a first copy larger than that is judged alone, whole)."""
        first = queued[0]
        inputs, count = int(first.x.shape[0]), 1
        for item in islice(queued, 1, None):
            inputs += int(item.x.shape[0])
            if inputs > self.sampling.judge_batch or not joinable(first, item):
                break
            count += 1
        return count

    def _handle_queued(self, items: list[Queued]) -> None:
        """The worker's handler: judge queued copies (:meth:`_joined`) in one call, each input
        with its own request's id."""
        ids = [i for item in items for i in item.request_ids]
        x, labels = items[0].x, items[0].labels
        if len(items) > 1:
            try:
                x = torch.cat([item.x for item in items])
                if labels is not None:  # given for all of them (joinable)
                    parts = [item.labels for item in items if item.labels is not None]
                    labels = torch.cat([part.to(x.device) for part in parts])
            except Exception as exc:  # e.g. out of memory: counted like a failed judge call
                self._count_failure(exc, len(ids))
                return
        self._judge(x, labels, len(ids), request_ids=ids)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the async worker has judged every queued input (True), or ``timeout``
        seconds passed (False). True at once in sync mode."""
        return self._worker.flush(timeout) if self._worker is not None else True

    # --------------------------------------------------------------- failures
    def _count_failure(self, exc: Exception, rows: int = 0, prefix: str = "") -> None:
        """Count a monitoring failure (and its ``rows`` skipped inputs); log a kind once."""
        kind = prefix + type(exc).__name__
        with self._lock:
            self.failures[kind] += 1
            first = kind not in self._logged_failures
            self._logged_failures.add(kind)
        if self.metrics is not None:
            self.metrics.failure(failure_kind(exc, prefix))
            self.metrics.skipped("failed", rows)
        if first:
            log.warning(
                "surprise monitor failed (%s: %s); the model's output is returned", kind, exc
            )

    def _count_model_error(self, rows: int) -> None:
        """Count ``rows`` inputs skipped because the model itself raised on them (not a
        monitoring failure: the model's exception goes to the caller)."""
        if self.metrics is not None:
            self.metrics.skipped("model_error", rows)

    # -------------------------------------------------------------- lifecycle
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

    def close(self, timeout: float | None = None) -> None:
        """Drain the async queue (at most ``timeout`` seconds), stop the worker and the metrics
        server, remove the metric series and the timing hooks (idempotent)."""
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
