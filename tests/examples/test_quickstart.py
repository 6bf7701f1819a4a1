"""The README's first command, shortened: train, calibrate through the CLI, monitor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "12",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "why a few inputs alarmed" in proc.stdout
    fig = json.loads(out.read_text())
    ev = fig["evaluation"]
    assert ev["n"] == 360 and ev["accuracy"] > 0.9
    assert (tmp_path / "work" / "digits_table.safetensors").is_file()
    # Normal digits alarm near the nominal 1%; atypical inputs nearly always.
    assert ev["alarm"] < 0.05, ev
    for name in ("inverted", "noise"):
        assert fig[name]["alarm"] > 0.5, (name, fig[name], ev)
        assert fig[name]["alarm"] > ev["alarm"] + 0.4
    # Over random re-splits the interpolated p-values alarm on about 1% on average (the
    # conservative ones on floor(0.01 * 360) / 360 = 0.83%, no ties).
    assert abs(fig["resampled_alarm_rate"]["mean"] - 0.01) < 0.0015
