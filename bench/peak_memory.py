"""Peak resident memory of one inference mode, measured in a fresh process.

Usage: ``python bench/peak_memory.py MODEL MODE BATCH`` with MODE ``plain`` or ``monitor``
(or the peers ``captum`` / ``gradcam``, see ``bench._setup.peer_runner``).
Prints JSON: ``idle_kib`` (resident after loading the model, the table and one batch-1 warm-up
call), ``peak_kib`` (the high-water mark while running three calls at BATCH),
``call_kib = peak_kib - idle_kib`` (the working memory of a call) and ``process_hwm_kib``, the
high-water mark of the whole process (``VmHWM``: importing, building the model, loading the
table from its file, building the monitor, the warm-up and the three calls).

The monitor's table must exist before (``bench._setup.table_for`` makes it in another process
if it does not: calibrating is not what is measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._setup import batch, build_model, peer_runner, table_for  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _ensure_table(name: str) -> None:
    """Make the model's cached table in a separate process (not measured here)."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from bench._setup import build_model, table_for; "
        f"table_for({name!r}, build_model({name!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    name, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode != "plain":
        _ensure_table(name)
    model = build_model(name)
    x = batch(n=n)
    if mode == "plain":

        def run(inputs):
            with torch.inference_mode():
                return model(inputs)
    elif mode == "monitor":
        from surprise_monitor.monitor import SurpriseMonitor

        run = SurpriseMonitor(model, table_for(name, model, check=False)).inspect
    elif mode in ("captum", "gradcam"):
        run = peer_runner(mode, name, model)
    else:
        raise SystemExit(f"unknown mode {mode}")
    run(x[:1])
    idle = _status_kib("VmRSS")
    before = _status_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    for _ in range(3):
        run(x)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "idle_kib": idle,
                "peak_kib": peak,
                "call_kib": peak - idle,
                "process_hwm_kib": max(before, peak),
            }
        )
    )


if __name__ == "__main__":
    main()
