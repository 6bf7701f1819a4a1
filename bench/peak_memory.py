"""Peak resident memory of one inference mode, measured in a fresh process.

Usage: ``python bench/peak_memory.py MODEL MODE BATCH`` with MODE ``plain`` or ``monitor``
(or the peers ``captum`` / ``gradcam``, see ``bench._setup.peer_runner``).
Prints JSON: ``idle_kib`` (resident after loading the model, the table and one batch-1 warm-up
call), ``peak_kib`` (the high-water mark while running three calls at BATCH) and
``call_kib = peak_kib - idle_kib`` (the working memory of a call).
"""

from __future__ import annotations

import json
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


def main() -> None:
    name, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = build_model(name)
    x = batch(n=n)
    if mode == "plain":

        def run(inputs):
            with torch.inference_mode():
                return model(inputs)
    elif mode == "monitor":
        from monitor import SurpriseMonitor

        run = SurpriseMonitor(model, table_for(name, model)).inspect
    elif mode in ("captum", "gradcam"):
        run = peer_runner(mode, name, model)
    else:
        raise SystemExit(f"unknown mode {mode}")
    run(x[:1])
    idle = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    for _ in range(3):
        run(x)
    peak = _status_kib("VmHWM")
    print(json.dumps({"idle_kib": idle, "peak_kib": peak, "call_kib": peak - idle}))


if __name__ == "__main__":
    main()
