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
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surprise_monitor.monitor.alarms.explanations import ExplanationCache
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
#: Sender keys remembered to keep a resent record once (the newest).
KEYS_REMEMBERED = 100_000


def prepare_alarm(
    report: MonitorReport, x: torch.Tensor, table: CalibrationTable | None, *,
    max_filters: int = 5, size: int = 96, mean: Any = None, std: Any = None,
) -> tuple[dict[str, Any], bytes, torch.Tensor, int | None]:  # fmt: skip
    """What a record holds of one alarm: the one-input ``report``'s sample (``max_filters``
    each way), the thumbnail PNG of ``x`` un-normalised with ``table``'s preprocessing (or
    ``mean`` / ``std``), a CPU copy of ``x`` and the label given (``None``: judged against the
    prediction)."""
    source = table.data_source if table is not None else None
    image = x.detach().to("cpu", copy=True)
    sample = report.sample(0, max_filters=max_filters)
    thumb = thumbnail_png(image, source, size=size, mean=mean, std=std)
    label = int(report.classes[0]) if report.labels_given else None
    return sample, thumb, image, label


@dataclass(frozen=True)
class AlarmRecord:
    """One alarm: the one-input report (``MonitorReport.sample``), its input's thumbnail."""

    id: int
    time: float  # seconds since the epoch
    request_id: str | None
    table_fingerprint: str
    report: dict[str, Any]
    thumbnail: bytes = field(repr=False)
    replica: str | None = None  # the serving replica that judged it (several replicas)
    key: str | None = None  # the sender's unique key: a resent record is kept once

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlarmRecord:
        """A record from its audit line (:meth:`to_json`)."""
        return cls(
            int(data["id"]), float(data["time"]), data.get("request_id"),
            str(data.get("table_fingerprint", "")), dict(data["report"]),
            base64.b64decode(data.get("thumbnail_png", "")), data.get("replica"), data.get("key"),
        )  # fmt: skip

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
        """The record as JSON without the thumbnail (``replica`` and ``key`` when set)."""
        out = {
            "id": self.id, "time": self.time, "request_id": self.request_id,
            "table_fingerprint": self.table_fingerprint, "class_name": self.class_name,
            "kinds": list(self.kinds), "report": self.report,
        }  # fmt: skip
        out.update({k: v for k, v in (("replica", self.replica), ("key", self.key)) if v})
        return out

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
        self._explanations = ExplanationCache(explanations, self.explain_kwargs)
        self._keys: OrderedDict[str, AlarmRecord] = OrderedDict()
        last = sink.last_record() if sink is not None else None
        last_id = last.get("id") if last is not None else None
        ok = isinstance(last_id, int) and not isinstance(last_id, bool) and last_id >= 0
        first = last_id + 1 if ok else 1
        self._ids = itertools.count(first)  # a restart continues the audit file's ids
        self._lock = threading.Lock()
        self._judge: Judge | None = None
        self._table: CalibrationTable | None = None
        self._fingerprint = ""

    # ---------------------------------------------------------------- recording
    def bind(self, judge: Judge) -> None:
        """Use ``judge`` (and its table) for thumbnails, fingerprints and explanations
        (``SurpriseMonitor`` calls this)."""
        self._judge, self._table = judge, judge.table
        self._fingerprint = judge.table.fingerprint()

    def record(self, report: MonitorReport, x: torch.Tensor, request_id: str | None) -> AlarmRecord:
        """Keep one alarm: its one-input ``report``, its normalised input ``x`` ``[C, H, W]``,
        the request it came with; written to the sink (if any) before returning."""
        sample, thumb, image, label = self.prepare(report, x)
        return self.add(sample, thumb, request_id=request_id, fingerprint=self._fingerprint,
                        image=image, label=label)  # fmt: skip

    def prepare(
        self, report: MonitorReport, x: torch.Tensor
    ) -> tuple[dict[str, Any], bytes, torch.Tensor, int | None]:
        """What a record holds of one alarm: the report's sample, the thumbnail PNG, a CPU copy
        of the input and the label given (``None``: judged against the prediction)."""
        return prepare_alarm(
            report, x, self._table, max_filters=self.max_filters, size=self.thumbnail_size,
            mean=self.explain_kwargs.get("mean"), std=self.explain_kwargs.get("std"),
        )  # fmt: skip

    def add(
        self, report: dict[str, Any], thumbnail: bytes, *, request_id: str | None,
        fingerprint: str, image: torch.Tensor | None = None, label: int | None = None,
        when: float | None = None, replica: str | None = None, key: str | None = None,
    ) -> AlarmRecord:  # fmt: skip
        """Keep a prepared alarm (:meth:`prepare`, possibly in another process) under the next
        id, written to the sink before returning. A ``key`` seen before returns the record kept
        for it, unchanged: a sender that resends after a lost answer is recorded once."""
        with self._lock:
            if key is not None and key in self._keys:
                return self._keys[key]
            when = time.time() if when is None else when
            rec = AlarmRecord(next(self._ids), when, request_id, fingerprint, report, thumbnail,
                              replica, key)  # fmt: skip
            if self.sink is not None:  # under the lock: the file keeps the records' order
                self.sink.write(rec.to_json())
            self._keep(rec)
            if image is not None:
                self._inputs[rec.id] = (image, label)
                while len(self._inputs) > self.keep_inputs:
                    self._inputs.popitem(last=False)
            self.recorded += 1
        return rec

    def _keep(self, rec: AlarmRecord) -> None:
        """Put ``rec`` in the ring and remember its key (under the lock)."""
        self._records.append(rec)
        if rec.key is not None:
            self._keys[rec.key] = rec
            while len(self._keys) > KEYS_REMEMBERED:
                self._keys.popitem(last=False)

    def reload(self) -> int:
        """Put the audit file's newest records back in the ring, with their keys (a restarted
        process's page shows them; their inputs are gone, so they have no explanation).
        Returns how many were read; 0 without a sink."""
        if self.sink is None:
            return 0
        newest: deque[AlarmRecord] = deque(maxlen=max(self.capacity, KEYS_REMEMBERED))
        for data in self.sink.records():
            try:
                newest.append(AlarmRecord.from_json(data))
            except (KeyError, TypeError, ValueError):
                continue  # not a record this log wrote
        with self._lock:
            for rec in newest:
                self._keep(rec)
        return len(newest)

    def input_of(self, alarm_id: int) -> tuple[torch.Tensor, int | None] | None:
        """The alarm's kept input and label (``None`` once it left the kept inputs)."""
        with self._lock:
            return self._inputs.get(alarm_id)

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
        return self._explanations.get(alarm_id, self._judge, lambda: self.input_of(alarm_id))

    def explanation_if_ready(self, alarm_id: int) -> dict[str, Any] | None:
        """The alarm's explanation summary (``Explanation.to_dict()``) when it has been computed
        (successfully) and is still cached, else ``None``; computes nothing."""
        return self._explanations.ready(alarm_id)

    def explanations_cached(self) -> int:
        """Explanations held now (at most ``explanations``)."""
        return len(self._explanations)

    def close(self) -> None:
        """Stop the explanation worker and close the sink (idempotent)."""
        self._explanations.close(wait=True)
        if self.sink is not None:
            self.sink.close()
