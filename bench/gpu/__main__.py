"""``python -m bench.gpu [--out DIR] [--budget SECONDS] [--sections a,b,...]``

Runs the GPU benchmark (see :mod:`bench.gpu`) and writes ``DIR/gpu.json`` and ``DIR/gpu.md``
(the tables of ``bench/README.md``). ``DEV=cpu`` runs tiny versions on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu import sections
from bench.gpu.report import markdown

SECTIONS: dict[str, Callable[[sections.Config], Any]] = {
    "kernels": sections.kernels,
    "overhead": sections.overhead,
    "half_models": sections.half_models,
    "profile": sections.profile,
    "calibration": sections.calibration,
}


def _environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device, for the report."""
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cudnn": torch.backends.cudnn.version(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the sections within the budget; every section is guarded."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--out", default="out/gpu", help="folder for gpu.json and gpu.md")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the whole run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    args = parser.parse_args(argv)
    device = torch.device(os.environ.get("DEV", "cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = sections.Config(device, time.time() + args.budget)
    result: dict[str, Any] = {"env": _environment(device), "errors": {}, "seconds": {}}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"--sections: unknown section {name!r}; one of {', '.join(SECTIONS)}")
        if cfg.left() < 10:
            result["errors"][name] = "skipped: out of time"
            continue
        start = time.time()
        try:
            result[name] = SECTIONS[name](cfg)
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            result["errors"][name] = (
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
            )
        result["seconds"][name] = round(time.time() - start, 1)
        status = "ERROR" if name in result["errors"] else "ok"
        print(f"[{name}] {result['seconds'][name]} s {status}", flush=True)
        (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu.md").write_text(markdown(result))
    print((out / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
