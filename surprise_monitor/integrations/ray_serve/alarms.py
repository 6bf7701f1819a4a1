"""One alarm log for a Ray Serve application: the log, the replicas' senders, the page's view.

- :class:`AlarmLogServer` is a deployment of one replica (a Ray actor) holding the application's
  :class:`~surprise_monitor.monitor.alarms.AlarmLog` and its JSONL audit file. When it restarts
  (Serve replaces a dead replica) it reopens the audit file, continues its ids and puts the
  file's newest records back on the page: no record that reached the file is lost.
- :class:`ReplicaAlarmRecorder` is each model replica's alarm recorder
  (``SurpriseMonitor(alarm_log=...)``): on the request path it only prepares the record (the
  report's sample and the thumbnail, as :class:`AlarmLog` does) and queues it; a sender thread
  delivers the queue in order and resends what was not acknowledged. Each record carries a key
  (``<replica>:<sequence>``) that the log keeps once, so a resend after a lost answer is not
  written twice: every alarm reaches the audit file exactly once while the log is reachable.
- :class:`RemoteAlarmView` gives the operator's page
  (:func:`surprise_monitor.monitor.web.alarm_app`, served by the model replicas) the log's
  reading methods; an explanation is computed on demand in the replica that serves the page (it
  has the model), on a worker thread, never on the request path, from the input the log keeps.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from surprise_monitor.monitor.alarms.explanations import ExplanationCache
from surprise_monitor.monitor.alarms.log import (
    DEFAULT_CAPACITY,
    AlarmLog,
    AlarmRecord,
    prepare_alarm,
)
from surprise_monitor.monitor.alarms.sink import DEFAULT_MAX_BYTES
from surprise_monitor.monitor.errors import SurpriseMonitorError

if TYPE_CHECKING:
    from surprise_monitor.monitor.judge import Judge
    from surprise_monitor.monitor.report import MonitorReport

log = logging.getLogger(__name__)

#: Alarms a replica queues for the log before it refuses more (counted as failures).
OUTBOX_SIZE = 10_000
#: Seconds one delivery may take before it is retried.
SEND_TIMEOUT = 10.0


class AlarmOutboxFullError(SurpriseMonitorError, RuntimeError):
    """The replica's queue of alarms for the log is full (the log is unreachable or slow)."""


class AlarmLogServer:
    """The application's alarm log (deploy with one replica; :func:`.app.build_app` does).

    Args:
        capacity: records kept for the page.
        audit: the JSONL audit file (on the node the log runs on), or ``None``.
        audit_max_bytes: rotate the audit file at this size.
        keep_inputs: the newest records whose input is kept for an explanation.
    """

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, audit: str | None = None,
        audit_max_bytes: int = DEFAULT_MAX_BYTES, keep_inputs: int = 64,
    ) -> None:  # fmt: skip
        self.log = AlarmLog(capacity, sink=audit, sink_max_bytes=audit_max_bytes,
                            keep_inputs=keep_inputs)  # fmt: skip
        self.reloaded = self.log.reload()
        if self.reloaded:
            log.info("alarm log: %d record(s) of %s back on the page", self.reloaded, audit)

    def record(self, payload: dict[str, Any]) -> int:
        """Keep one alarm sent by a replica (:meth:`ReplicaAlarmRecorder.payload`); its id
        (the first one's, for a key seen before)."""
        image = payload.get("image")
        rec = self.log.add(
            payload["report"], payload["thumbnail"], request_id=payload.get("request_id"),
            fingerprint=payload.get("fingerprint", ""),
            image=None if image is None else torch.tensor(np.asarray(image)),
            label=payload.get("label"), when=payload.get("time"),
            replica=payload.get("replica"), key=payload.get("key"),
        )  # fmt: skip
        return rec.id

    def recent(
        self, cls: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The records newest first, as JSON summaries (no thumbnails)."""
        return [r.summary() for r in self.log.recent(cls, kind, limit)]

    def get(self, alarm_id: int) -> dict[str, Any] | None:
        """One record with its thumbnail (the audit line), or ``None``."""
        rec = self.log.get(alarm_id)
        return None if rec is None else rec.to_json()

    def input_of(self, alarm_id: int) -> tuple[np.ndarray, int | None] | None:
        """The alarm's kept input (a numpy array) and label, or ``None``."""
        kept = self.log.input_of(alarm_id)
        return None if kept is None else (kept[0].numpy(), kept[1])

    def status(self) -> dict[str, Any]:
        """What the page's header and filters need: alarms recorded, capacity, class names."""
        return {
            "recorded": self.log.recorded, "capacity": self.log.capacity,
            "keep_inputs": self.log.keep_inputs, "class_names": self.log.class_names(),
            "reloaded": self.reloaded, "kept": len(self.log),
        }  # fmt: skip

    def __del__(self) -> None:
        self.log.close()


class ReplicaAlarmRecorder:
    """A model replica's alarm recorder: prepares each alarm on the request path, delivers it
    to the log from a sender thread, in order, resending until acknowledged.

    Args:
        send: delivers one payload and returns when the log has it (raises otherwise), e.g.
            ``lambda p: handle.record.remote(p).result(timeout_s=10)``.
        replica: this replica's id (shown on the page with each alarm).
        outbox: alarms queued at most; beyond, :meth:`record` raises
            :class:`AlarmOutboxFullError` (the request path counts it as a failure).
        max_filters, thumbnail_size: as :class:`AlarmLog`'s.
        backoff: seconds before the first resend, and the most between resends (doubling).
    """

    def __init__(
        self, send: Any, replica: str, *, outbox: int = OUTBOX_SIZE, max_filters: int = 5,
        thumbnail_size: int = 96, backoff: tuple[float, float] = (0.1, 2.0),
    ) -> None:  # fmt: skip
        self.send, self.replica = send, str(replica)
        self.max_filters, self.thumbnail_size = max_filters, thumbnail_size
        self.delivered = 0
        self.resent = 0
        self.backoff = backoff
        self._queue: deque[dict[str, Any]] = deque()
        self._outbox = outbox
        self._seq = itertools.count(1)
        self._token = f"{time.time_ns():x}"  # keys stay unique if a replica id is reused
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._table: Any = None
        self._fingerprint = ""
        self._thread = threading.Thread(target=self._run, name="surprise-alarm-sender",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def bind(self, judge: Judge) -> None:
        """Use ``judge``'s table for thumbnails and the fingerprint (``SurpriseMonitor`` calls
        this)."""
        self._table, self._fingerprint = judge.table, judge.table.fingerprint()

    def payload(self, report: MonitorReport, x: torch.Tensor, request_id: str | None) -> dict:
        """The record of one alarm as sent to the log."""
        sample, thumb, image, label = prepare_alarm(
            report, x, self._table, max_filters=self.max_filters, size=self.thumbnail_size
        )
        return {
            "report": sample, "thumbnail": thumb, "request_id": request_id,
            "fingerprint": self._fingerprint, "image": image.float().numpy(), "label": label,
            "time": time.time(), "replica": self.replica,
            "key": f"{self.replica}:{self._token}:{next(self._seq)}",
        }  # fmt: skip

    def record(self, report: MonitorReport, x: torch.Tensor, request_id: str | None) -> str:
        """Queue one alarm for the log; its key."""
        item = self.payload(report, x, request_id)
        with self._cond:
            if len(self._queue) >= self._outbox:
                raise AlarmOutboxFullError(
                    f"{len(self._queue)} alarms wait for the alarm log (is it running?)"
                )
            self._queue.append(item)
            self._cond.notify_all()
        return item["key"]

    def pending(self) -> int:
        """Alarms not yet acknowledged by the log."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the log has acknowledged every queued alarm (True) or ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        """The sender: deliver the oldest queued alarm, resend it until acknowledged."""
        first, most = self.backoff
        backoff = first
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue[0]
                self._busy = True
            try:
                self.send(item)
            except Exception as exc:  # the log is restarting or unreachable: resend
                log.warning("alarm log unreachable (%s: %s); resending", type(exc).__name__, exc)
                with self._cond:
                    self._busy = False
                    self.resent += 1
                    if self._closing:  # close() waited its time: give up
                        return
                time.sleep(backoff)
                backoff = min(2 * backoff, most)
                continue
            backoff = first
            with self._cond:
                self._queue.popleft()
                self._busy = False
                self.delivered += 1
                self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (for at most ``timeout`` s), then stop the sender."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)


class RemoteAlarmView:
    """The reading side of an alarm log held by another process, for the operator's page
    (:func:`~surprise_monitor.monitor.web.alarm_app` calls it on worker threads).

    Args:
        call: ``call(method, *args)`` runs one of :class:`AlarmLogServer`'s methods and returns
            its result (blocking), e.g. through a Serve deployment handle.
        judge: this replica's judge (model and table), for explanations.
        explanations: explanations cached here; ``explain_kwargs`` go to ``explain``.
    """

    def __init__(
        self, call: Any, judge: Judge | None, *, explanations: int = 32,
        explain_kwargs: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.call, self.judge = call, judge
        self._explanations = ExplanationCache(explanations, explain_kwargs)
        self._status: dict[str, Any] = {}

    def _fresh_status(self) -> dict[str, Any]:
        """The log's status now (also kept for the fixed fields)."""
        self._status = self.call("status")
        return self._status

    @property
    def recorded(self) -> int:
        """Alarms the log has recorded since it started."""
        return int(self._fresh_status()["recorded"])

    @property
    def capacity(self) -> int:
        """Records the log keeps."""
        return int((self._status or self._fresh_status())["capacity"])

    @property
    def keep_inputs(self) -> int:
        """The newest records whose input the log keeps."""
        return int((self._status or self._fresh_status())["keep_inputs"])

    def recent(
        self, cls: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[AlarmRecord]:
        """The log's records newest first, of class ``cls`` and flag ``kind`` (no thumbnails)."""
        return [AlarmRecord.from_json(d) for d in self.call("recent", cls, kind, limit)]

    def get(self, alarm_id: int) -> AlarmRecord | None:
        """One record with its thumbnail, or ``None`` when the log no longer keeps it."""
        data = self.call("get", alarm_id)
        return None if data is None else AlarmRecord.from_json(data)

    def class_names(self) -> list[str]:
        """The class names of the kept records."""
        return list(self._fresh_status()["class_names"])

    def __len__(self) -> int:
        return int(self._fresh_status()["kept"])

    def explanation(self, alarm_id: int) -> Future | None:
        """A future of ``(figure PNG, Explanation.to_dict())``, computed here on a worker
        thread from the input the log keeps; ``None`` when the log no longer keeps it."""

        def kept() -> tuple[torch.Tensor, int | None] | None:
            found = self.call("input_of", alarm_id)
            return None if found is None else (torch.tensor(np.asarray(found[0])), found[1])

        return self._explanations.get(alarm_id, self.judge, kept)

    def explanation_if_ready(self, alarm_id: int) -> dict[str, Any] | None:
        """The explanation's summary when computed here and still cached, else ``None``."""
        return self._explanations.ready(alarm_id)

    def close(self) -> None:
        """Stop the explanation worker (a running explanation is abandoned)."""
        self._explanations.close(wait=False)
