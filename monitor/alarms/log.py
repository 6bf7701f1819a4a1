"""The record of recent alarms: what an operator looks at when an alert fires.

:class:`AlarmLog` is the request path's alarm recorder (``SurpriseMonitor(alarm_log=...)``). For
each input that alarms it keeps an :class:`AlarmRecord`: the one-input report as JSON, a thumbnail
of the un-normalised input, the time, the request id and the table's fingerprint. Memory is bounded
under any traffic: at most ``capacity`` records (the oldest leave first), the inputs of the newest
``keep_inputs`` of them (what an explanation needs), and at most ``explanations`` cached explanation
figures. With ``sink=`` every record also goes, before :meth:`AlarmLog.record` returns, to an
append-only JSONL audit file rotated by size
(:class:`surprise_monitor.monitor.alarms.sink.JsonlSink`); a log opened on an existing audit file
continues its ids after the file's last record, so an id names one record across restarts (one
process writes a file: a second is refused). Explanations
(:func:`surprise_monitor.monitor.explain.explain`: the input with the region behind its most
surprising / expected filter, that filter's training exemplars) are computed only when asked for, on
one worker thread, never on the request path, and cached.
"""

from __future__ import annotations

import base64
import itertools
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surprise_monitor.monitor.alarms.sink import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, JsonlSink
from surprise_monitor.monitor.alarms.thumbnails import thumbnail_png
from surprise_monitor.monitor.checks import positive_int

if TYPE_CHECKING:
    from surprise_monitor.monitor.judge import Judge
    from surprise_monitor.monitor.report import MonitorReport
    from surprise_monitor.monitor.table import CalibrationTable

#: Alarm records kept (the operator page's recent alarms).
DEFAULT_CAPACITY = 500
#: The kinds an alarm can be filtered by: which per-filter flags explain it.
KINDS = ("surprise", "expectation", "low_beta")


@dataclass(frozen=True)
class AlarmRecord:
    """One alarm: the one-input report (``MonitorReport.sample``), its input's thumbnail."""

    id: int
    time: float  # seconds since the epoch
    request_id: str | None
    table_fingerprint: str
    report: dict[str, Any]
    thumbnail: bytes = field(repr=False)

    @property
    def class_name(self) -> str:
        """The class the input was judged against (its prediction unless a label was given)."""
        return str(self.report.get("class_name", self.report.get("class")))

    @property
    def kinds(self) -> tuple[str, ...]:
        """Which per-filter flags the input has: ``surprise``, ``expectation``, ``low_beta``."""
        r = self.report
        found = (r.get("surprise_count", 0) > 0, r.get("expectation_count", 0) > 0,
                 bool(r.get("low_beta")))  # fmt: skip
        return tuple(k for k, hit in zip(KINDS, found, strict=True) if hit)

    def summary(self) -> dict[str, Any]:
        """The record as JSON without the thumbnail."""
        return {
            "id": self.id, "time": self.time, "request_id": self.request_id,
            "table_fingerprint": self.table_fingerprint, "class_name": self.class_name,
            "kinds": list(self.kinds), "report": self.report,
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The audit file's line: :meth:`summary` and the thumbnail as base64 PNG."""
        return {**self.summary(), "thumbnail_png": base64.b64encode(self.thumbnail).decode()}


class AlarmLog:
    """Recent alarms, bounded, with an optional audit file and explanations on demand.

    Args:
        capacity: records kept in memory (the oldest leave first).
        sink: a JSONL audit file path (or a :class:`JsonlSink`), or ``None``.
        sink_max_bytes, sink_backups: the audit file's rotation (when ``sink`` is a path).
        keep_inputs: the newest records whose input is kept for an explanation.
        explanations: explanation figures cached.
        thumbnail_size: the thumbnails' longer side in pixels.
        max_filters: surprising / expected filters kept in each record's report.
        explain_kwargs: passed to :func:`~surprise_monitor.monitor.explain.explain` (e.g.
            ``exemplars_k=3``; ``mean=`` / ``std=`` when the table records no normalisation: the
            thumbnails use them too).
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        sink: str | Path | JsonlSink | None = None,
        sink_max_bytes: int = DEFAULT_MAX_BYTES,
        sink_backups: int = DEFAULT_BACKUPS,
        keep_inputs: int = 64,
        explanations: int = 32,
        thumbnail_size: int = 96,
        max_filters: int = 5,
        explain_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("capacity", capacity),
            ("keep_inputs", keep_inputs),
            ("explanations", explanations),
            ("thumbnail_size", thumbnail_size),
        ):
            positive_int(name, value)
        self.capacity, self.keep_inputs, self.max_explanations = capacity, keep_inputs, explanations
        self.thumbnail_size, self.max_filters = thumbnail_size, max_filters
        self.explain_kwargs = dict(explain_kwargs or {})
        if sink is not None and not isinstance(sink, JsonlSink):
            sink = JsonlSink(sink, max_bytes=sink_max_bytes, backups=sink_backups)
        self.sink = sink
        self.recorded = 0  # alarms recorded since the start (the ring holds the newest)
        self._records: deque[AlarmRecord] = deque(maxlen=capacity)
        self._inputs: OrderedDict[int, tuple[torch.Tensor, int | None]] = OrderedDict()
        self._explained: OrderedDict[int, Future] = OrderedDict()
        last = sink.last_record() if sink is not None else None
        last_id = last.get("id") if last is not None else None
        ok = isinstance(last_id, int) and not isinstance(last_id, bool) and last_id >= 0
        first = last_id + 1 if ok else 1
        self._ids = itertools.count(first)  # a restart continues the audit file's ids
        self._lock = threading.Lock()
        self._judge: Judge | None = None
        self._table: CalibrationTable | None = None
        self._fingerprint = ""
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- recording
    def bind(self, judge: Judge) -> None:
        """Use ``judge`` (and its table) for thumbnails, fingerprints and explanations
        (``SurpriseMonitor`` calls this)."""
        self._judge, self._table = judge, judge.table
        self._fingerprint = judge.table.fingerprint()

    def record(self, report: MonitorReport, x: torch.Tensor, request_id: str | None) -> AlarmRecord:
        """Keep one alarm: its one-input ``report``, its normalised input ``x`` ``[C, H, W]``,
        the request it came with; written to the sink (if any) before returning."""
        source = self._table.data_source if self._table is not None else None
        image = x.detach().to("cpu", copy=True)
        sample = report.sample(0, max_filters=self.max_filters)
        thumb = thumbnail_png(
            image, source, size=self.thumbnail_size,
            mean=self.explain_kwargs.get("mean"), std=self.explain_kwargs.get("std"),
        )  # fmt: skip
        label = int(report.classes[0]) if report.labels_given else None
        with self._lock:
            rec = AlarmRecord(next(self._ids), time.time(), request_id, self._fingerprint,
                              sample, thumb)  # fmt: skip
            self._records.append(rec)
            self._inputs[rec.id] = (image, label)
            while len(self._inputs) > self.keep_inputs:
                self._inputs.popitem(last=False)
            self.recorded += 1
            if self.sink is not None:  # under the lock: the file keeps the records' order
                self.sink.write(rec.to_json())
        return rec

    # ------------------------------------------------------------------ reading
    def recent(
        self, cls: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[AlarmRecord]:
        """The records newest first, of class name ``cls`` and with flag ``kind`` if given."""
        with self._lock:
            records = list(self._records)
        out = [
            r for r in reversed(records)
            if (cls is None or r.class_name == cls) and (kind is None or kind in r.kinds)
        ]  # fmt: skip
        return out if limit is None else out[:limit]

    def get(self, alarm_id: int) -> AlarmRecord | None:
        """The record ``alarm_id`` if it is still kept."""
        with self._lock:
            for r in self._records:
                if r.id == alarm_id:
                    return r
        return None

    def class_names(self) -> list[str]:
        """The class names the kept records have, sorted."""
        with self._lock:
            return sorted({r.class_name for r in self._records})

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def inputs_kept(self) -> int:
        """How many records' inputs are kept now (at most ``keep_inputs``)."""
        with self._lock:
            return len(self._inputs)

    # ------------------------------------------------------------- explanations
    def explanation(self, alarm_id: int) -> Future | None:
        """A future of ``(figure PNG bytes, Explanation.to_dict())`` for the alarm, computed
        once on the worker thread and cached; ``None`` when its input is no longer kept (or
        no judge is bound)."""
        with self._lock:
            cached = self._explained.get(alarm_id)
            if cached is not None:
                self._explained.move_to_end(alarm_id)
                return cached
            kept = self._inputs.get(alarm_id)
            if kept is None or self._judge is None:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="surprise-alarm-explain")
            future = self._pool.submit(self._explain, kept[0], kept[1])
            self._explained[alarm_id] = future
            while len(self._explained) > self.max_explanations:
                self._explained.popitem(last=False)
            return future

    def explanation_if_ready(self, alarm_id: int) -> dict[str, Any] | None:
        """The alarm's explanation summary (``Explanation.to_dict()``) when it has been computed
        (successfully) and is still cached, else ``None``; computes nothing."""
        with self._lock:
            future = self._explained.get(alarm_id)
        if future is None or not future.done() or future.cancelled():
            return None
        if future.exception() is not None:
            return None
        return future.result()[1]

    def explanations_cached(self) -> int:
        """Explanations held now (at most ``explanations``)."""
        with self._lock:
            return len(self._explained)

    def _explain(self, x: torch.Tensor, label: int | None) -> tuple[bytes, dict[str, Any]]:
        """The explanation figure of ``x`` as PNG bytes and its summary (worker thread)."""
        from surprise_monitor.monitor.explain.explanation import explain

        assert self._judge is not None
        expl = explain(self._judge, x, label=label, **self.explain_kwargs)
        with tempfile.TemporaryDirectory(prefix="surprise-alarm-") as folder:
            path = expl.save_figure(Path(folder) / "figure.png")
            return path.read_bytes(), expl.to_dict()

    def close(self) -> None:
        """Stop the explanation worker and close the sink (idempotent)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.sink is not None:
            self.sink.close()
