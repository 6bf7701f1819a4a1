"""One alarm log for many replicas, without Ray: the log server, the replicas' senders that
resend until acknowledged, a restart on the same audit file, the page over a remote view."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from starlette.testclient import TestClient

from surprise_monitor.integrations.ray_serve.alarms import (
    AlarmLogServer,
    AlarmOutboxFullError,
    RemoteAlarmView,
    ReplicaAlarmRecorder,
)
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.alarms import read_records
from surprise_monitor.monitor.web.app import alarm_app
from tests._models import heldout_dataset

PLAIN = {"mean": [0.0] * 3, "std": [1.0] * 3}  # the test table records no normalisation


def _noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -5.0 + 9.4 * torch.rand(n, 3, 8, 8, generator=g)


class FlakySend:
    """Delivers to ``server``; calls 1-3 lose the answer after the server kept the record,
    calls 5-7 fail before it (the log unreachable)."""

    def __init__(self, server: AlarmLogServer) -> None:
        self.server, self.calls = server, 0

    def __call__(self, payload: dict) -> int:
        self.calls += 1
        if 5 <= self.calls <= 7:
            raise ConnectionError("log restarting")
        alarm_id = self.server.record(payload)
        if self.calls <= 3:
            raise TimeoutError("answer lost")
        return alarm_id


def _traffic(monitor: SurpriseMonitor, replica: int) -> Counter[str]:
    """Batches of normal images with noise; the alarms each request id should have."""
    expected: Counter[str] = Counter()
    for i in range(4):
        x = torch.cat([heldout_dataset(6, start=7000 + 10 * i).tensors[0], _noise(3, i)])
        rid = f"r{replica}-{i}"
        report = monitor.run(x, request_id=rid).report
        expected[rid] += int(report.alarm.sum())
    return expected


def test_two_replicas_each_alarm_once_in_order_despite_lost_answers(calibrated, tmp_path):
    model, table = calibrated
    audit = tmp_path / "alarms.jsonl"
    server = AlarmLogServer(capacity=100, audit=str(audit))
    expected: Counter[str] = Counter()
    recorders = []
    for replica in (1, 2):
        recorder = ReplicaAlarmRecorder(FlakySend(server), f"replica{replica}",
                                        backoff=(0.01, 0.05))  # fmt: skip
        with SurpriseMonitor(model, table, alarm_log=recorder) as monitor:
            expected += _traffic(monitor, replica)
        assert recorder.flush(30) and recorder.pending() == 0
        recorders.append(recorder)
    records = list(read_records(audit))
    assert sum(expected.values()) >= 24  # every noise input alarms
    assert Counter(r["request_id"] for r in records) == expected  # each exactly once
    assert [r["id"] for r in records] == list(range(1, len(records) + 1))
    for replica in (1, 2):  # each replica's alarms in the order it sent them
        seq = [
            int(r["key"].rsplit(":", 1)[1]) for r in records if r["replica"] == f"replica{replica}"
        ]
        assert seq == sorted(seq) and len(set(seq)) == len(seq)
    assert all(rec.resent == 6 for rec in recorders)
    for rec in recorders:
        rec.close()

    # a restarted log reopens the file: the page has the records back, ids continue, and a
    # record resent after the restart (its answer was lost) is not written twice
    server.log.close()
    again = AlarmLogServer(capacity=100, audit=str(audit))
    assert again.reloaded == len(records) and again.status()["kept"] == len(records)
    old = dict(records[-1], thumbnail=b"png", image=None)
    assert again.record(old) == records[-1]["id"]
    fresh = dict(old, key="replica1:x:999")
    assert again.record(fresh) == len(records) + 1
    assert len(list(read_records(audit))) == len(records) + 1
    again.log.close()


def test_a_full_outbox_is_refused_and_counted_not_raised(calibrated):
    model, table = calibrated
    gate = threading.Event()
    recorder = ReplicaAlarmRecorder(lambda payload: gate.wait(30), "r", outbox=2)
    with SurpriseMonitor(model, table, alarm_log=recorder) as monitor:
        out = monitor(_noise(6, 0))
        assert out.shape == (6, 3)  # the prediction is served
        assert monitor.failures["recorder:AlarmOutboxFullError"] >= 1
        with pytest.raises(AlarmOutboxFullError, match="wait for the alarm log"):
            recorder.record(monitor.last_report.select([0]), _noise(1, 1)[0], "x")
    gate.set()
    assert recorder.flush(30)
    recorder.close()


def test_the_page_over_a_remote_view_shows_replicas_and_explains(calibrated, tmp_path):
    model, table = calibrated
    server = AlarmLogServer(capacity=50, audit=str(tmp_path / "a.jsonl"))
    recorder = ReplicaAlarmRecorder(server.record, "abc123")
    with SurpriseMonitor(model, table, alarm_log=recorder) as monitor:
        monitor.run(_noise(4, 9), request_id="req-9")
        assert recorder.flush(30)
        view = RemoteAlarmView(lambda method, *a: getattr(server, method)(*a), monitor.judge,
                               explain_kwargs=PLAIN)  # fmt: skip
        client = TestClient(alarm_app(view, monitor))
        listed = client.get("/alarms.json").json()
        assert {a["replica"] for a in listed["alarms"]} == {"abc123"}
        assert listed["status"]["recorded"] == 4
        first = listed["alarms"][-1]["id"]
        page = client.get("/").text
        assert page.count("replica abc123") == 4 and "req-9" in page
        assert 'id="replica">abc123' in client.get(f"/{first}").text
        thumb = client.get(f"/{first}/thumbnail.png")
        assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
        explained = client.get(f"/{first}/explanation.json")
        assert explained.status_code == 200, explained.text
        assert "filter" in explained.json()
        assert client.get("/999/explanation.png").status_code == 404
        view.close()
    recorder.close()
    server.log.close()
