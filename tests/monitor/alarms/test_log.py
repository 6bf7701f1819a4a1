"""The alarm log: what the request path hands it, bounded memory under a burst, thumbnails
against numpy, the audit file, explanations computed lazily off the request path and cached."""

from __future__ import annotations

import io
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.alarms import AlarmLog, read_records
from surprise_monitor.monitor.alarms.thumbnails import thumbnail_png
from surprise_monitor.monitor.options import MetricsOptions
from tests._models import heldout_dataset, mixed_inputs

PLAIN = {"mean": [0.0] * 3, "std": [1.0] * 3}  # the test table records no normalisation


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -5.0 + 9.4 * torch.rand(n, 3, 8, 8, generator=g)  # uniform over the images' range


def test_the_request_path_records_each_alarm_with_its_request(calibrated, tmp_path):
    model, table = calibrated
    log = AlarmLog(capacity=100, sink=tmp_path / "audit" / "alarms.jsonl")
    x = torch.cat([heldout_dataset(20, start=7000).tensors[0], _noise(6)])
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        report = monitor.run(x, request_id="req-7").report
        monitor.run(x[:3], request_id="req-8")
    rows = torch.nonzero(report.alarm).flatten().tolist()
    assert len(rows) >= 6 and set(range(20, 26)) <= set(rows)  # every noise input alarms
    records = log.recent()
    assert [r.request_id for r in records] == ["req-7"] * len(rows)  # newest first
    for rec, row in zip(reversed(records), rows, strict=True):
        assert rec.report == report.sample(row, max_filters=5)
        assert rec.table_fingerprint == table.fingerprint()
        assert rec.thumbnail.startswith(b"\x89PNG")
        assert rec.class_name == table.class_names[int(report.classes[row])]
    audit = list(read_records(tmp_path / "audit" / "alarms.jsonl"))
    assert [a["id"] for a in audit] == [r.id for r in reversed(records)]
    assert audit[0]["report"] == records[-1].report and audit[0]["thumbnail_png"]
    log.close()


def test_filters_by_class_and_kind(calibrated):
    model, table = calibrated
    log = AlarmLog()
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        monitor(torch.cat([_noise(30), mixed_inputs(12)]))
    everything = log.recent()
    assert len(everything) == log.recorded >= 30
    for name in log.class_names():
        got = log.recent(cls=name)
        assert got and all(r.class_name == name for r in got)
    assert sum(len(log.recent(cls=c)) for c in log.class_names()) == len(everything)
    for kind in ("surprise", "expectation", "low_beta"):
        want = [r.id for r in everything if kind in r.kinds]
        assert [r.id for r in log.recent(kind=kind)] == want
    assert any(r.kinds for r in everything)
    assert [r.id for r in log.recent(limit=3)] == [r.id for r in everything[:3]]


def test_bounded_memory_under_a_burst(calibrated):
    model, table = calibrated
    log = AlarmLog(capacity=50, keep_inputs=10, explanations=4, explain_kwargs=PLAIN)
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        one = monitor.inspect(_noise(1))
        x = _noise(1)[0]

        def burst(n: int) -> None:
            for _ in range(n):
                log.record(one, x, "burst")

        burst(200)
        tracemalloc.start()
        burst(500)
        first, _ = tracemalloc.get_traced_memory()
        burst(2000)
        second, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(log) == 50 and log.recorded == 2700 and log.inputs_kept() == 10
        assert second - first < 64 * 1024, (first, second)  # flat: nothing grows with traffic
        ids = [r.id for r in log.recent()]
        assert ids == list(range(2700, 2650, -1))
        assert log.explanation(2700 - 10) is None  # its input is gone: no explanation
        futures = [log.explanation(i) for i in range(2700, 2694, -1)]
        assert all(f is not None for f in futures) and log.explanations_cached() == 4
        for f in futures:
            f.result(timeout=120)
    log.close()


def test_explanations_are_lazy_cached_and_off_the_request_path(calibrated, monkeypatch):
    from surprise_monitor.monitor.explain import explanation

    model, table = calibrated
    calls: list[str] = []
    real = explanation.explain

    def spy(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(explanation, "explain", spy)
    log = AlarmLog(explain_kwargs=PLAIN)
    x = _noise(4, seed=3)
    with SurpriseMonitor(model, table, alarm_log=log) as monitor:
        monitor(x)
        assert calls == [] and len(log) == 4  # nothing explained while serving
        newest = log.recent()[0]
        future = log.explanation(newest.id)
        png, summary = future.result(timeout=120)
        assert log.explanation(newest.id) is future and len(calls) == 1  # cached
        assert calls[0].startswith("surprise-alarm-explain")
        direct = monitor.explain(x[3], **PLAIN)
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).width > 100
    assert summary["filter"] == direct.filter and summary["kind"] == direct.kind
    assert summary["class"] == direct.cls == newest.report["class"]
    assert log.explanation(10_000) is None
    log.close()


def test_thumbnail_unnormalises_with_the_tables_preprocessing():
    g = torch.Generator().manual_seed(0)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randn(3, 8, 8, generator=g)
    png = thumbnail_png(x, {"mean": mean, "std": std}, size=64)
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert got.shape == (64, 64, 3)  # 8 px enlarged 8x, nearest
    want = np.clip(x.double().numpy() * np.array(std)[:, None, None]
                   + np.array(mean)[:, None, None], 0, 1).transpose(1, 2, 0)  # fmt: skip
    want = np.round(want * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    np.testing.assert_array_equal(got, want)
    big = thumbnail_png(torch.zeros(1, 300, 200), {"mean": [0.5], "std": [0.5]}, size=96)
    im = Image.open(io.BytesIO(big))
    assert max(im.size) == 96 and im.mode == "L"
    assert np.all(np.asarray(im) == 128)  # 0 * 0.5 + 0.5 -> 127.5 -> 128
    unknown = thumbnail_png(x, None, size=16)  # no recorded normalisation: min-max scaled
    arr = np.asarray(Image.open(io.BytesIO(unknown)))
    assert arr.min() == 0 and arr.max() == 255


def test_bad_arguments_are_named(calibrated):
    with pytest.raises(ValueError, match="capacity"):
        AlarmLog(capacity=0)
    with pytest.raises(ValueError, match="keep_inputs"):
        AlarmLog(keep_inputs=-1)
    model, table = calibrated
    with pytest.raises(ValueError, match="metrics.window must be an integer >= 1"):
        SurpriseMonitor(model, table, metrics=MetricsOptions(window=0))
    with pytest.raises(TypeError, match="alarm_log must have a record"):
        SurpriseMonitor(model, table, alarm_log=object())


def test_a_failing_recorder_is_counted_not_raised(calibrated):
    from prometheus_client import CollectorRegistry

    class Broken:
        def record(self, report, x, request_id):
            raise OSError("disk full")

    model, table = calibrated
    registry = CollectorRegistry()
    x = _noise(3)
    with SurpriseMonitor(model, table, alarm_log=Broken(), metrics=registry) as monitor:
        res = monitor.run(x)
        assert torch.equal(res.output, model(x))  # the answer is served
        assert monitor.failures == {"recorder:OSError": 3}
        got = registry.get_sample_value("surprise_monitor_failures_total", {"kind": "callback"})
        assert got == 3


def test_ids_continue_across_restarts_on_one_audit_file(calibrated, tmp_path):
    model, table = calibrated
    path = tmp_path / "alarms.jsonl"
    seen: list[list[int]] = []
    for restart in range(4):  # a process each time: a new log on the same file
        log = AlarmLog(capacity=100, sink=path, sink_max_bytes=60_000, sink_backups=20)
        with SurpriseMonitor(model, table, alarm_log=log) as monitor:
            monitor.run(_noise(8, seed=restart), request_id=f"run-{restart}")
        seen.append([r.id for r in reversed(log.recent())])
        log.close()
    audit = [r["id"] for f in sorted(tmp_path.glob("alarms.jsonl*"), reverse=True)
             for r in read_records(f)]  # fmt: skip
    assert all(len(ids) >= 6 for ids in seen)
    assert audit == sorted(audit) and len(set(audit)) == len(audit)  # unique, in order
    assert audit == [i for ids in seen for i in ids] == list(range(1, len(audit) + 1))


def test_a_second_process_writing_the_same_audit_file_is_refused(tmp_path):
    import subprocess
    import sys

    from surprise_monitor.monitor.alarms.sink import AuditFileBusyError, JsonlSink

    path = tmp_path / "alarms.jsonl"
    held = JsonlSink(path)
    code = (
        "import sys; from surprise_monitor.monitor.alarms.sink import JsonlSink\n"
        "try:\n    JsonlSink(sys.argv[1])\nexcept OSError as e:\n    print(e); sys.exit(3)"
    )
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert other.returncode == 3 and "another process is writing" in other.stdout
    with pytest.raises(AuditFileBusyError, match="a file of its own"):
        JsonlSink(path)  # another open in the same process is refused too
    held.close()
    JsonlSink(path).close()  # free again once closed
