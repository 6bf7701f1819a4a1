"""Alarm rate per class on normal traffic: one pooled null against per-class (Mondrian) nulls.

For each model, the benchmark's table (all 50,000 training images; the nulls from test images
0..4,999, per class where a class has at least ``class_null_min`` of them) judges the report
images (test 5,000..9,999), which no part of calibration saw. Per predicted class (and per
true label, judged against it), the share of images with ``p <= rate`` at nominal 1% with its
exact 95% interval, for the per-class p-value the monitor reports and for the pooled p-value of
the same scores (``table.alarm.null_predicted``). A rate holds when the nominal rate lies in
the class's interval.

``python -m bench.alarms.class_rates [--models resnet18,vgg_bn]`` writes
``results/class_rates.json`` and prints the table ``bench/README.md`` quotes; ``python -m
bench.alarms`` computes the same numbers beside its detection tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.alarms import collect
from bench.alarms.scores import alarm_rate
from bench.alarms.sets import cifar_part
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.options import Thresholds
from surprise_monitor.monitor.table import CalibrationTable

HERE = Path(__file__).resolve().parent
RATE = 0.01


def per_class(p_values: np.ndarray, classes: np.ndarray, k: int, rate: float) -> list[dict]:
    """:func:`bench.alarms.scores.alarm_rate` of each class's p-values (``classes``: the class
    each input was judged against), with ``holds``: the nominal rate lies in its interval."""
    out = []
    for c in range(k):
        mine = p_values[classes == c]
        if mine.size == 0:
            out.append({"class": c, "inputs": 0})
            continue
        r = alarm_rate(mine, rate)
        out.append({"class": c, **r, "holds": r["ci_low"] <= rate <= r["ci_high"]})
    return out


def class_rates(
    table: CalibrationTable, judged: dict[str, np.ndarray], rate: float = RATE
) -> dict[str, Any]:
    """Per-class alarm rates of judged report images (:func:`bench.alarms.collect.judged`),
    with the monitor's p-values and with the pooled null's, against the predicted class and
    (where judged) the true label."""
    alarm = table.alarm
    assert alarm is not None and alarm.null_predicted is not None
    k = table.num_classes
    score = torch.from_numpy(judged["score"]).float()
    out: dict[str, Any] = {"nominal": rate, "class_null_min": alarm.class_null_min}
    pooled = alarm.null_predicted.p_values(score).numpy()
    views = [("predicted", judged["p_value"], judged["classes"])]
    if "p_value_labelled" in judged:
        views.append(("labelled", judged["p_value_labelled"], judged["labels"]))
    for name, p, classes in views:
        nulls = alarm.class_null(name == "labelled")
        out[name] = {
            "heldout_per_class": None if nulls is None else nulls.sizes.tolist(),
            "overall": alarm_rate(p, rate),
            "per_class": per_class(p, classes, k, rate),
        }
    out["predicted"]["pooled_overall"] = alarm_rate(pooled, rate)
    out["predicted"]["pooled_per_class"] = per_class(pooled, judged["classes"], k, rate)
    return out


def _cell(r: dict) -> str:
    """``1.2% (0.5-2.4)``, bold when the nominal rate is outside the interval."""
    if not r.get("inputs"):
        return "-"
    text = f"{r['rate']:.1%} ({r['ci_low']:.1%}-{r['ci_high']:.1%})"
    return text if r["holds"] else f"**{text}**"


def markdown(results: dict[str, dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """One table per model: per predicted class, the images, the pooled and per-class rates."""
    lines = []
    for model, res in results.items():
        pred = res["predicted"]
        k = len(pred["per_class"])
        labels = list(names) if names and len(names) == k else [str(c) for c in range(k)]
        lines += [
            f"**{model}** (nominal {res['nominal']:.0%}; per-class nulls for classes with >= "
            f"{res['class_null_min']} held-out images; bold: nominal outside the exact 95% "
            "interval)",
            "",
            "| judged against | " + " | ".join(labels) + " | all |",
            "|---|" + "---:|" * (k + 1),
            "| held-out images (null) | "
            + " | ".join(map(str, pred["heldout_per_class"] or []))
            + f" | {sum(pred['heldout_per_class'] or [])} |",
            "| report images (predicted) | "
            + " | ".join(str(r["inputs"]) for r in pred["per_class"])
            + f" | {pred['overall']['inputs']} |",
            "| pooled null, predicted class | "
            + " | ".join(_cell(r) for r in pred["pooled_per_class"])
            + f" | {_cell(_overall(pred['pooled_overall'], res['nominal']))} |",
            "| **per-class null, predicted class** | "
            + " | ".join(_cell(r) for r in pred["per_class"])
            + f" | {_cell(_overall(pred['overall'], res['nominal']))} |",
        ]
        if "labelled" in res:
            lab = res["labelled"]
            lines.append(
                "| per-class null, true label | "
                + " | ".join(_cell(r) for r in lab["per_class"])
                + f" | {_cell(_overall(lab['overall'], res['nominal']))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _overall(r: dict, rate: float) -> dict:
    """``r`` with ``holds`` (the nominal rate in its interval)."""
    return {**r, "holds": r["ci_low"] <= rate <= r["ci_high"]}


def run_model(name: str, log: Any = print) -> dict[str, Any]:
    """The per-class rates of one model (its table and judged report images are cached)."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log)
    with SurpriseMonitor(model, table, thresholds=Thresholds(alarm_rate=RATE)) as monitor:
        judged = collect.judged(name, monitor, cifar_part("report"))
    res = class_rates(table, judged)
    res["class_names"] = list(table.class_names or [])
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    from bench.strong_models import STRONG_MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(STRONG_MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "class_rates.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.models.split(","):
        started = time.perf_counter()
        results[name] = run_model(name)
        results[name]["seconds"] = round(time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    first = next(iter(results.values()))
    print(markdown(results, first.get("class_names")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
