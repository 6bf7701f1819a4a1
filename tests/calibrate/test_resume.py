"""Resumable calibration: killed runs resume to the same table; foreign checkpoints are refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from surprise_monitor.calibrate import CalibrationTable, calibrate
from surprise_monitor.calibrate.checkpoint import CheckpointError, read_manifest
from surprise_monitor.calibrate.options import CheckpointOptions, RunOptions, TableOptions
from surprise_monitor.calibrate.sketch import LogGrid
from tests._checks import assert_same_table
from tests._models import TinyCNN, class_dataset, seeded

ROOT = Path(__file__).resolve().parents[2]


# A run on 480 images in 120 batches of 4, each image read with a short pause so that the run
# lasts about a second: long enough to be killed at random moments, short enough for a test.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch.utils.data import Dataset
    from surprise_monitor.calibrate import calibrate
    from surprise_monitor.calibrate.options import CheckpointOptions, RunOptions, TableOptions
    from tests._models import TinyCNN, class_dataset, seeded

    torch.set_num_threads(1)
    out, ckpt = sys.argv[1], sys.argv[2]

    class Slow(Dataset):
        def __init__(self):
            self.data = class_dataset(480, 3)
        def __len__(self):
            return len(self.data)
        def __getitem__(self, i):
            time.sleep(0.002)
            return self.data[i]

    model = seeded(TinyCNN(num_classes=3))
    checkpoint = None if ckpt == "-" else CheckpointOptions(ckpt, resume=True, every=3)
    print("ready", flush=True)
    table = calibrate(model, Slow(), progress=False, table=TableOptions(top_k=4),
                      run=RunOptions(batch_size=4), checkpoint=checkpoint)
    table.save(out)
    """
)


def _start(out: Path, ckpt: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out), ckpt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


def test_sigkill_at_random_moments_then_resume_gives_the_same_table(tmp_path):
    reference = tmp_path / "reference.safetensors"
    proc = _start(reference, "-")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.safetensors"
    progress = []  # batches recorded in the manifest after each kill
    for attempt in range(12):
        proc = _start(out, str(ckpt))
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        if attempt < 3:
            time.sleep(rng.uniform(0.0, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            manifest = read_manifest(ckpt)
            progress.append(None if manifest is None else manifest["batches_done"])
            if proc.returncode == 0:
                break
            continue
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        break
    # The kills landed inside the run, between checkpoints of a partial state.
    assert any(p is not None and 0 < p < 120 for p in progress), (seed, progress)
    assert_same_table(CalibrationTable.load(reference), CalibrationTable.load(out))
    manifest = read_manifest(ckpt)
    assert manifest["complete"] and manifest["batches_done"] == 120


class Interrupting(Dataset):
    """A dataset that raises once at image ``fail_at`` (a crash in the middle of a run)."""

    def __init__(self, n: int, fail_at: int | None) -> None:
        self.data = class_dataset(n, 3)
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            self.fail_at = None
            raise RuntimeError("simulated crash")
        return self.data[i]


@pytest.mark.parametrize("approximate", [False, LogGrid(0.02, 1e-6, 1e2)])
def test_interrupted_run_resumes_to_the_uninterrupted_table(tmp_path, approximate):
    model = seeded(TinyCNN(num_classes=3))
    # alarm=False: the alarm's passes read the data again after the statistics (they are not
    # checkpointed); this test is about resuming the training pass.
    kw = {"run": RunOptions(batch_size=5, approximate=approximate), "progress": False,
          "table": TableOptions(top_k=3), "alarm": False}  # fmt: skip
    plain = calibrate(model, Interrupting(90, None), **kw)
    data = Interrupting(90, fail_at=62)
    with pytest.raises(RuntimeError, match="simulated crash"):
        calibrate(model, data, checkpoint=CheckpointOptions(tmp_path, every=4), **kw)
    manifest = read_manifest(tmp_path)
    assert manifest["batches_done"] == 12 and not manifest["complete"]  # batches 0..11 kept
    if approximate:
        assert len(list(tmp_path.glob("sketch-*.safetensors"))) == 1
    resume = CheckpointOptions(tmp_path, resume=True)
    resumed = calibrate(model, data, checkpoint=resume, **kw)
    assert_same_table(plain, resumed)
    # A finished checkpoint resumes straight to the statistics (in exact mode, with any top_k).
    top_k = 3 if approximate else 2
    again = calibrate(model, Interrupting(90, fail_at=1), checkpoint=resume,
                      **{**kw, "table": TableOptions(top_k=top_k)})  # fmt: skip
    assert torch.equal(again.quantiles, plain.quantiles)
    assert torch.equal(again.top_indices, plain.top_indices[..., :top_k])
    if approximate:
        with pytest.raises(CheckpointError, match="top_k"):
            calibrate(model, data, checkpoint=resume, **{**kw, "table": TableOptions(top_k=2)})


def test_rows_written_after_the_last_checkpoint_are_dropped(tmp_path):
    model = seeded(TinyCNN(num_classes=3))
    data = Interrupting(40, fail_at=33)
    with pytest.raises(RuntimeError):
        calibrate(model, data, run=RunOptions(batch_size=4),
                  checkpoint=CheckpointOptions(tmp_path, every=3), progress=False)  # fmt: skip
    rows = read_manifest(tmp_path)["accumulator"]["rows"]
    assert sum(rows.values()) == 24  # six batches of four committed
    # Simulate a kill mid-write: garbage appended to a class file after the checkpoint.
    with open(tmp_path / "class_0.alpha", "ab") as f:
        f.write(b"\x00" * 4 * 16 * 5 + b"\x01\x02")
    resumed = calibrate(model, data, run=RunOptions(batch_size=4),
                        checkpoint=CheckpointOptions(tmp_path, resume=True),
                        progress=False)  # fmt: skip
    plain = calibrate(model, Interrupting(40, None), run=RunOptions(batch_size=4), progress=False)
    assert_same_table(plain, resumed)


def test_foreign_checkpoints_are_refused(tmp_path):
    model = seeded(TinyCNN(num_classes=3))
    data = class_dataset(30, 3)
    kw = {"progress": False}
    fresh, resume = CheckpointOptions(tmp_path), CheckpointOptions(tmp_path, resume=True)
    run = RunOptions(batch_size=4)
    calibrate(model, data, run=run, checkpoint=fresh, **kw)
    with pytest.raises(CheckpointError, match="holds a checkpoint of an earlier run"):
        calibrate(model, data, run=run, checkpoint=fresh, **kw)
    other_weights = seeded(TinyCNN(num_classes=3), seed=5)
    with pytest.raises(CheckpointError, match="model_fingerprint"):
        calibrate(other_weights, data, run=run, checkpoint=resume, **kw)
    with pytest.raises(CheckpointError, match="data: checkpoint"):
        calibrate(model, class_dataset(30, 3, seed=1), run=run, checkpoint=resume, **kw)
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 4, now 5"):
        calibrate(model, data, run=RunOptions(batch_size=5), checkpoint=resume, **kw)
    with pytest.raises(CheckpointError, match="amp"):
        calibrate(model, data, run=RunOptions(batch_size=4, amp=True), checkpoint=resume, **kw)
    with pytest.raises(CheckpointError, match="mode"):
        calibrate(model, data, run=RunOptions(batch_size=4, approximate=True), checkpoint=resume,
                  **kw)  # fmt: skip
    with pytest.raises(CheckpointError, match="class_output"):
        calibrate(model, data, table=TableOptions(class_output="softmax"), run=run,
                  checkpoint=resume, **kw)  # fmt: skip
    # A damaged checkpoint (spill shorter than recorded) is refused, not silently used.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    path = tmp_path / "class_1.alpha"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match="changed or lost since the checkpoint"):
        calibrate(model, data, run=run, checkpoint=resume, **kw)
    assert manifest["settings"]["num_images"] == 30


def test_unplannable_data_is_refused_for_checkpoints(tmp_path):
    model = seeded(TinyCNN(num_classes=3))
    loader = torch.utils.data.DataLoader(class_dataset(12, 3), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="map-style dataset read in index order"):
        calibrate(model, loader, checkpoint=CheckpointOptions(tmp_path), progress=False)
    # resume= alone (no checkpoint folder) cannot be said any more: the old keyword is refused.
    with pytest.raises(TypeError, match=r"resume= is now checkpoint=CheckpointOptions\(dir="):
        calibrate(model, class_dataset(12, 3), resume=True, progress=False)
    with pytest.raises(ValueError, match="not both"):
        calibrate(model, class_dataset(12, 3), run=RunOptions(spill_dir=tmp_path),
                  checkpoint=CheckpointOptions(tmp_path))  # fmt: skip
    assert np.all(np.isfinite(calibrate(model, class_dataset(12, 3), progress=False).mean.numpy()))


def test_the_checkpoint_records_the_deciding_options_of_the_groups(tmp_path):
    from surprise_monitor.calibrate.checkpoint import DECIDING_OPTIONS, deciding_options

    assert DECIDING_OPTIONS == {TableOptions: ("class_output",), RunOptions: ("amp",)}
    table, run = TableOptions(class_output="softmax", top_k=2), RunOptions(amp=True, batch_size=3)
    assert deciding_options(table, run, CheckpointOptions(tmp_path)) == {
        "class_output": "softmax",
        "amp": True,
    }
    model = seeded(TinyCNN(num_classes=3))
    calibrate(model, class_dataset(12, 3), progress=False, table=table, alarm=False,
              run=RunOptions(batch_size=4), checkpoint=CheckpointOptions(tmp_path))  # fmt: skip
    settings = read_manifest(tmp_path)["settings"]
    assert settings["class_output"] == "softmax" and settings["amp"] is False
    assert settings["batch_size"] == 4 and settings["layer"] is None
    assert "top_k" not in settings and "memory_budget_bytes" not in settings  # exact mode
