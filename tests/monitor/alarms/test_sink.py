"""The JSONL audit sink: appends, rotation by size, and no lost or corrupt records on a crash
mid-write (a partial tail left by hand, and a writer process killed with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surprise_monitor.monitor.alarms.sink import JsonlSink, read_records

ROOT = Path(__file__).resolve().parents[3]


def test_appends_and_reads_back(tmp_path):
    sink = JsonlSink(tmp_path / "a" / "alarms.jsonl")
    for i in range(5):
        sink.write({"i": i, "text": "<script>\n"})
    sink.close()
    assert [r["i"] for r in read_records(tmp_path / "a" / "alarms.jsonl")] == list(range(5))
    assert (tmp_path / "a" / "alarms.jsonl").read_text().count("\n") == 5  # one line each
    with pytest.raises(ValueError, match="closed"):
        sink.write({"i": 5})
    with pytest.raises(ValueError, match="max_bytes"):
        JsonlSink(tmp_path / "b.jsonl", max_bytes=0)


def test_rotation_by_size_keeps_the_newest_and_bounds_the_disk(tmp_path):
    path = tmp_path / "alarms.jsonl"
    sink = JsonlSink(path, max_bytes=1000, backups=2)
    line = len(json.dumps({"i": 0, "pad": "x" * 80}, separators=(",", ":"))) + 1
    for i in range(100):
        sink.write({"i": i, "pad": "x" * 80})
    files = sink.files()
    assert [f.name for f in files] == ["alarms.jsonl.2", "alarms.jsonl.1", "alarms.jsonl"]
    assert all(f.stat().st_size <= 1000 for f in files)
    per_file = 1000 // line
    got = [r["i"] for r in sink.records()]
    assert got == list(range(100 - len(got), 100))  # the newest, in order, none missing
    assert len(got) == 2 * per_file + (100 % per_file or per_file)
    assert sink.rotations == (100 - 1) // per_file
    sink.close()


def test_a_partial_last_line_is_dropped_and_earlier_records_kept(tmp_path):
    path = tmp_path / "alarms.jsonl"
    sink = JsonlSink(path)
    for i in range(3):
        sink.write({"i": i})
    sink.close()
    with path.open("ab") as f:  # what a crash in the middle of a write leaves
        f.write(b'{"i":3,"pad":"xxx')
    assert [r["i"] for r in read_records(path)] == [0, 1, 2]
    again = JsonlSink(path)  # reopening cuts the partial line off, then appends cleanly
    again.write({"i": 4})
    again.close()
    assert [r["i"] for r in read_records(path)] == [0, 1, 2, 4]
    assert path.read_bytes().endswith(b'{"i":4}\n')


_WRITER = """
import sys
sys.path.insert(0, {root!r})
from surprise_monitor.monitor.alarms.sink import JsonlSink
sink = JsonlSink({path!r}, max_bytes=20000, backups=1000)
i = 0
while True:
    sink.write({{"i": i, "pad": "y" * (i % 500)}})
    i += 1
"""


def _written(folder: Path) -> int:
    """Bytes in the sink's files now; a file the running writer renames (rotation) between the
    listing and its ``stat`` counts as 0 (its bytes are counted under the new name next time)."""
    total = 0
    for f in folder.glob("alarms.jsonl*"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_a_writer_killed_mid_stream_loses_at_most_the_record_being_written(tmp_path):
    path = tmp_path / "alarms.jsonl"
    code = _WRITER.format(root=str(ROOT), path=str(path))
    for attempt in range(3):  # kill at different moments
        proc = subprocess.Popen([sys.executable, "-c", code])
        before = _written(tmp_path)
        deadline = time.monotonic() + 120  # the writer imports torch first: wait for its lines
        while _written(tmp_path) < before + 5000:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        sink = JsonlSink(path, max_bytes=20000, backups=1000)  # recovers, like a restart
        got = [r["i"] for r in sink.records()]
        sink.close()
        # every complete record of every run is there, in order, each parsed whole
        runs = [0] + [k for k in range(1, len(got)) if got[k] == 0]
        for a, b in zip(runs, runs[1:] + [len(got)], strict=True):
            assert got[a:b] == list(range(b - a))
        assert len(runs) == attempt + 1 and len(got) > 10 * (attempt + 1)
        for f in sink.files():  # no partial line left behind (a file just rotated in is empty)
            data = f.read_bytes()
            assert data == b"" or data.endswith(b"\n")
