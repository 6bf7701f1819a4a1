"""How many misclassified CIFAR-10 test images does "suppressing surprise" fix? (paper, Sec. 4.5)

Pipeline: a model and its calibration table on training images, then for the first ``--images``
misclassified test images (the file is in random order) :func:`surprise_monitor.monitor.explain.fix`
with

- ``surprise``: superpixels ranked by the gradient through the most surprising filter relative
  to the true class (the paper's method),
- ``vanilla``: ranked by the plain input gradient of the true class's score (the paper's
  baseline),
- ``random``: ranked at random (a control, not in the paper),

each over the same sweep of SLIC superpixel counts and removal counts. An image is fixed when
any point of the sweep classifies it as its label. The paper reports ~36% (surprise) against
~32% (vanilla) on ImageNet with VGG16. Rates come with binomial standard errors; surprise is
compared with vanilla and random on the same images (paired difference, McNemar's test).

The model: ``--model resnet18`` or ``--model vgg_bn``, a strong model of
:mod:`bench.strong_models` with its table on all 50,000 training images
(:mod:`bench.strong_tables`); else a small CNN trained on the CPU (``--arch``,
:func:`bench.cifar.train_or_load`, cached) with its table on the first ``--calib`` training
images. The paper report's version of this experiment, on both strong models with the sweep
broken down and the explaining experiments, is :mod:`bench.paper.fixing`.

Run: ``python -m bench.fix_rate`` (``--help`` for options); a few minutes on a 2-core CPU once the
model is cached.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cifar import (  # noqa: E402
    cache_dir,
    cifar10_dataset,
    data_source,
    load_cifar10,
    predict,
    to_tensor,
    train_or_load,
)
from bench.strong_models import STRONG_MODELS, load_strong  # noqa: E402
from bench.strong_tables import strong_table  # noqa: E402
from surprise_monitor.calibrate import CalibrationTable, calibrate, model_fingerprint  # noqa: E402
from surprise_monitor.calibrate.options import RunOptions, TableOptions
from surprise_monitor.monitor import SurpriseMonitor  # noqa: E402
from surprise_monitor.monitor.explain import DEFAULT_N_SEGMENTS, DEFAULT_REMOVE, METHODS, fix  # noqa: E402
from surprise_monitor.monitor.probe.layers import FINAL_CONV  # noqa: E402


def table_for(
    model: torch.nn.Module,
    n_calib: int,
    *,
    data_dir: str | Path | None = None,
    cache: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> CalibrationTable:
    """The model's calibration table on the first ``n_calib`` training images, at the paper's
    final convolution (``layer="final-conv"``); cached by the weights' fingerprint."""
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"table-{model_fingerprint(model)[:16]}-{n_calib}.safetensors"
    if path.is_file():
        try:
            return CalibrationTable.load(path)
        except ValueError:
            path.unlink()
    started = time.perf_counter()
    table = calibrate(
        model,
        cifar10_dataset("train", data_dir, n_calib),
        layer=FINAL_CONV,
        progress=False,
        table=TableOptions(data_source=data_source("train", data_dir, n_calib)),
        run=RunOptions(batch_size=250),
    )
    table.save(path)
    if log:
        log(f"calibrated on {n_calib} training images in {time.perf_counter() - started:.0f} s")
    return CalibrationTable.load(path)


def fix_row(
    monitor: SurpriseMonitor,
    x: torch.Tensor,
    label: int,
    *,
    methods: Sequence[str] = METHODS,
    n_segments: Sequence[int] = DEFAULT_N_SEGMENTS,
    remove: Sequence[int] = DEFAULT_REMOVE,
    seed: int = 0,
) -> dict[str, Any]:
    """Every method on one misclassified image ``x`` (normalised ``[C, H, W]``) with true label
    ``label``: whether and how it was fixed, every point of the sweep (``attempts``: rows of
    ``[n_segments, segments_found, removed, removed_pixels, prediction]``) and the seconds."""
    row: dict[str, Any] = {"label": int(label), "pixels": int(x.shape[-1] * x.shape[-2])}
    for m in methods:
        t = time.perf_counter()
        r = fix(monitor, x, int(label), method=m, n_segments=n_segments, remove=remove,
                seed=seed)  # fmt: skip
        row[m] = {
            "fixed": r.fixed, "removed_pixels": None if r.mask is None else int(r.mask.sum()),
            "n_segments": r.n_segments, "removed": r.removed,
            "attempts": [[a.n_segments, a.segments_found, a.removed, a.removed_pixels,
                          a.prediction] for a in r.attempts],
            "seconds": time.perf_counter() - t,
        }  # fmt: skip
        if m == "surprise":
            row["prediction"], row["filter"], row["filter_kind"] = (
                r.prediction, r.filter, r.filter_kind,
            )  # fmt: skip
    return row


def proportion(hits: int, n: int) -> dict[str, float]:
    """``hits / n`` in percent with its binomial standard error (percentage points)."""
    p = hits / n if n else float("nan")
    se = math.sqrt(p * (1 - p) / n) if n else float("nan")
    return {"fixed": hits, "images": n, "percent": 100.0 * p, "se": 100.0 * se}


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Method a's fix rate minus method b's on the same images, in percentage points, with the
    standard error of a paired difference and McNemar's exact two-sided p-value (the binomial
    test on the images only one of the two fixed)."""
    from scipy.stats import binomtest

    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    d = (only_a - only_b) / n if n else float("nan")
    var = ((only_a + only_b) / n - d * d) / n if n else float("nan")
    disc = only_a + only_b
    p = binomtest(only_a, disc, 0.5).pvalue if disc else 1.0
    return {"difference": 100.0 * d, "se": 100.0 * math.sqrt(max(var, 0.0)),
            "only_first": only_a, "only_second": only_b, "p_value": float(p)}  # fmt: skip


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Fix rates (with standard errors) of each method over ``rows`` (from :func:`fix_row`),
    the median pixels a fix removes, the images with a flagged surprising filter, and the
    paired comparison of surprise with vanilla and with random."""
    n = len(rows)
    summary: dict[str, Any] = {"images": n, "methods": {}}
    for m in methods:
        fixed = [r for r in rows if r[m]["fixed"]]
        summary["methods"][m] = {
            **proportion(len(fixed), n),
            "median_removed_pixels": statistics.median([r[m]["removed_pixels"] for r in fixed])
            if fixed else None,
            "seconds": sum(r[m].get("seconds", 0.0) for r in rows),
        }  # fmt: skip
    if "surprise" in methods:
        flagged = [r for r in rows if r["filter_kind"] == "surprise"]
        summary["flagged_surprise"] = len(flagged)
        summary["fixed_when_flagged"] = sum(r["surprise"]["fixed"] for r in flagged)
        for other in ("vanilla", "random"):
            if other in methods:
                summary[f"surprise_minus_{other}"] = paired_difference(
                    [r["surprise"]["fixed"] for r in rows], [r[other]["fixed"] for r in rows]
                )
    if "surprise" in methods and "vanilla" in methods:
        s = [r["surprise"]["fixed"] for r in rows]
        v = [r["vanilla"]["fixed"] for r in rows]
        summary["both"] = sum(a and b for a, b in zip(s, v, strict=True))
        summary["surprise_only"] = sum(a and not b for a, b in zip(s, v, strict=True))
        summary["vanilla_only"] = sum(b and not a for a, b in zip(s, v, strict=True))
    return summary


def fix_rate(
    monitor: SurpriseMonitor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    methods: Sequence[str] = METHODS,
    n_segments: Sequence[int] = DEFAULT_N_SEGMENTS,
    remove: Sequence[int] = DEFAULT_REMOVE,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method on each (misclassified) image of ``x`` with true labels ``y``."""
    rows: list[dict[str, Any]] = []
    for i in range(len(x)):
        rows.append(fix_row(monitor, x[i], int(y[i]), methods=methods, n_segments=n_segments,
                            remove=remove, seed=i))  # fmt: skip
        if log and (i + 1) % 25 == 0:
            done = ", ".join(f"{m} {sum(r[m]['fixed'] for r in rows)}" for m in methods)
            log(f"{i + 1}/{len(x)} images: fixed {done}")
    summary = summarise(rows, methods)
    summary.update(n_segments=list(n_segments), remove=list(remove), rows=rows)
    return summary


def report(summary: dict[str, Any]) -> str:
    """The summary for people."""
    n = summary["images"]
    lines = [f"misclassified test images tried: {n} (sweep n_segments={summary['n_segments']}, "
             f"remove={summary['remove']})"]  # fmt: skip
    for m, s in summary["methods"].items():
        med = s["median_removed_pixels"]
        lines.append(
            f"  {m:<9} fixed {s['fixed']:>4} / {n} = {s['percent']:5.1f}% +- {s['se']:.1f}   "
            f"median pixels removed {med if med is not None else '-'}   {s['seconds']:.0f} s"
        )
    if "flagged_surprise" in summary:
        lines.append(
            f"  a surprising filter (P99.9 of the true class) was flagged for "
            f"{summary['flagged_surprise']} images; {summary['fixed_when_flagged']} of them fixed"
        )
    if "both" in summary:
        lines.append(
            f"  fixed by both {summary['both']}, surprise only {summary['surprise_only']}, "
            f"vanilla only {summary['vanilla_only']}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(prog="python -m bench.fix_rate", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=STRONG_MODELS, help="a strong model (overrides --arch)")
    p.add_argument("--arch", default="small_vgg_bn", help="bench.cifar.ARCHS key")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=20000, help="training images (first N)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--calib", type=int, default=20000, help="calibration images (first N)")
    p.add_argument("--images", type=int, default=200, help="misclassified test images to fix")
    p.add_argument("--n-segments", type=int, nargs="+", default=list(DEFAULT_N_SEGMENTS))
    p.add_argument("--remove", type=int, nargs="+", default=list(DEFAULT_REMOVE))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--data-dir", help="folder with cifar10_*.npz (default ../shared/data)")
    p.add_argument("--cache", help="weights / table cache (default ~/.cache/surprise-monitor)")
    p.add_argument("--out", help="write the full result (per image) as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: fix the misclassified test images, print (and save) the summary."""
    args = parser().parse_args(argv)
    started = time.perf_counter()
    if args.model:
        model = load_strong(args.model)
        table = strong_table(args.model, "train", model=model, data_dir=args.data_dir)
        args.arch = args.model
    else:
        model = train_or_load(args.arch, args.epochs, data_dir=args.data_dir,
                              n_train=args.n_train, width=args.width, cache=args.cache)  # fmt: skip
        table = table_for(model, args.calib, data_dir=args.data_dir, cache=args.cache)
    test = load_cifar10("test", args.data_dir)
    x, y = to_tensor(test.images), torch.from_numpy(test.labels)
    pred = predict(model, x)
    wrong = torch.nonzero(pred != y).flatten()
    accuracy = 1.0 - len(wrong) / len(y)
    print(f"{args.arch}: test accuracy {accuracy:.4f}; {len(wrong)} misclassified test images")
    take = wrong[: args.images]
    with SurpriseMonitor(model, table) as monitor:
        summary = fix_rate(
            monitor, x[take], y[take], methods=args.methods, n_segments=args.n_segments,
            remove=args.remove, log=print,
        )  # fmt: skip
    summary.update(
        arch=args.arch, test_accuracy=accuracy, test_indices=take.tolist(),
        total_seconds=time.perf_counter() - started, threads=torch.get_num_threads(),
    )  # fmt: skip
    print(report(summary))
    print(f"total {summary['total_seconds']:.0f} s on {torch.get_num_threads()} threads")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
