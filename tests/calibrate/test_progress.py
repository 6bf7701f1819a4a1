"""surprise-calibrate's progress bars: every pass shows a total (the alarm's passes too), and log
lines are written between bar updates, not glued onto a bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests._models import write_colour_folder

ROOT = Path(__file__).resolve().parents[2]
#: A tqdm bar's counter with its total, e.g. ``| 18.0/18.0 [`` or ``| 3/3 [``.
WITH_TOTAL = re.compile(r"\|\s*[\d.]+[kMG]?/[\d.]+[kMG]?\s*\[")
#: Any tqdm bar line: its elapsed time and rate, e.g. ``[00:00<00:00, 95.2img/s]``.
BAR = re.compile(r"\[\d+:\d\d(<[^,\]]*)?, [^\]]*/s\]")


def test_every_bar_has_a_total_and_log_lines_stand_alone(tmp_path):
    train = write_colour_folder(tmp_path / "train")
    heldout = write_colour_folder(tmp_path / "heldout", seed=1)
    cmd = [
        sys.executable, "-m", "surprise_monitor.calibrate", "--model",
        "tests._models:EightPixelNet", "--data", str(train), "--heldout", str(heldout),
        "--out", str(tmp_path / "t.safetensors"), "--resize", "0", "--crop", "0", "--mean", "0",
        "--std", "1", "--class-order", "red,green,blue", "--batch-size", "4", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pieces = [p.strip() for p in re.split(r"[\r\n]", proc.stderr) if p.strip()]
    bars = [p for p in pieces if BAR.search(p)]
    for desc in ("calibrate", "statistics", "profile grids", "score reference", "held-out null"):
        assert any(p.startswith(f"{desc}:") for p in bars), (desc, bars)
    assert all(WITH_TOTAL.search(p) for p in bars), [p for p in bars if not WITH_TOTAL.search(p)]
    logged = [p for p in pieces if "calibrate: " in p and not BAR.search(p)]
    assert any("the alpha spill takes" in p for p in logged)  # logged while a bar is open
    assert all(p.startswith("calibrate: ") for p in logged), logged
    assert all(p.endswith("]") for p in bars), bars  # nothing glued after a bar
