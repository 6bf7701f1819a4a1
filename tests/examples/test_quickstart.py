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
    assert "most surprising filters" in proc.stdout
    fig = json.loads(out.read_text())
    held = fig["held-out"]
    assert held["n"] == 599 and held["accuracy"] > 0.9
    assert (tmp_path / "work" / "digits_table.safetensors").is_file()
    # Atypical inputs are flagged far more often than held-out digits.
    for name in ("inverted", "noise"):
        assert fig[name]["flagged"] > held["flagged"] + 0.3, (name, fig[name], held)
