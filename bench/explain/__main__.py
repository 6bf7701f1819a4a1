"""Command line: ``python -m bench.explain [--model MODEL] [--images N]
[--contrast N] [--seed S] [--out PATH]`` (MODEL: resnet18, vgg_bn, vgg_plain, mobilenet)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.explain import report
from bench.explain.run import run
from bench.strong_models import ALARM_MODELS

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    """A progress line with the time."""
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pointing benchmark on one strong model and write the JSON and markdown."""
    p = argparse.ArgumentParser(description="Explanations that point at the cause")
    p.add_argument("--model", choices=ALARM_MODELS, default="resnet18")
    p.add_argument("--images", type=int, default=3000, help="test images per artefact kind")
    p.add_argument("--contrast", type=int, default=100, help="non-alarmed images scored per kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="results JSON (default: results/MODEL.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.images, args.contrast, args.seed, log, args.model)
    args.out = args.out or str(HERE / "results" / f"{args.model}.json")
    report.write(results, Path(args.out))
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
