"""``python -m bench.alarms.class_misses``: which predicted classes' alarm rate at nominal 1%
leaves 1% out of its exact 95% interval (issue 20's per-class check), for the default and for
energy alone on the same nulls and images, against how many chance alone would give.

Per model (the four of ``bench.strong_models.ALARM_MODELS``): the benchmark table with its KNN
component, the default's evidence (``learned+knn``, fitted as calibration fits it:
:func:`bench.alarms.knn_evidence.default_gate`) and ``energy`` (the one-line logit baseline as
the gated score's class evidence); the report part's CIFAR-10 images against per-class nulls of
held-out images 500..4,999 (:func:`bench.alarms.learned.alarm_rates`, the monitor's
interpolated p-values). A class whose rate's interval leaves out 1% for both scores is a class
whose report images, in this draw, sit differently against its null images whatever the
score; the two parts are a random split of the shuffled test file. The expected number of
such classes for exchangeable inputs counts the null's draw as well as the binomial one
(:func:`bench.alarms.class_rates.expected_interval_misses`).

How often the check fails by chance (:mod:`bench.alarms.class_resplits`), on the default's
scores: with every class's threshold known (the binomial draw alone), and over random
re-splits of the same 9,500 images into a null of 4,500 and 5,000 judged ones, for the
library's per-class nulls, the pooled null and a pooled null of per-class standardised scores;
and per class, whether the fixed split's two halves differ (two-sample KS, both scores).

Written: ``results/class_misses.json``; printed: the tables ``bench/README.md`` quotes.
Options: ``--models``, ``--splits``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.alarms import knn_evidence, learned
from bench.alarms.class_rates import expected_interval_misses
from bench.alarms.class_resplits import NULL_RULES, halves_differ, oracle_check, resplit_misses
from bench.alarms.report import log
from bench.strong_models import ALARM_MODELS
from surprise_monitor.monitor.atypicality import Gate

OUT = Path(__file__).resolve().parent / "results" / "class_misses.json"
RATE = 0.01
#: The scores compared: the default's evidence and energy alone.
SCORES = ("default", "energy")
#: Random re-splits of the null's and report's images per null rule.
SPLITS = 200
#: A class's halves differ where both scores' two-sample KS p-value is below this.
HALVES_LEVEL = 0.05


def misses(per_class: Sequence[Mapping], rate: float = RATE) -> list[dict]:
    """The classes of ``learned.alarm_rates``' per-class entries whose exact 95% interval
    leaves out ``rate``: class, alarms, inputs."""
    return [{"class": c["class"], "alarms": c["alarms"], "inputs": c["inputs"]}
            for c in per_class if not c["ci_low"] <= rate <= c["ci_high"]]  # fmt: skip


def run_model(name: str, splits: int = SPLITS) -> dict:
    """Both scores' overall rate and missing classes; the misses chance gives; how often the
    check fails on re-splits of the same images (per null rule, the default's score) and with
    a known threshold; and per class, whether the fixed split's halves differ (both scores)."""
    table, default, _ = knn_evidence.default_gate(name)
    alarm = table.alarm
    assert alarm is not None and alarm.gate_threshold is not None
    energy = Gate.columns(alarm.component_names(), "energy", alarm.gate_threshold)

    def columns(found: dict):
        """A judged set's components with the KNN distance's column."""
        return knn_evidence.knn_columns(table, found)

    k = table.num_classes
    out: dict = {"halves_ks": {}}
    for label, gate in zip(SCORES, (default, energy), strict=True):
        rates = learned.alarm_rates(name, table, gate, RATE, columns)
        out[label] = {"rate": rates["overall"]["rate"], "misses": misses(rates["per_class"])}
        sizes = [(c["null_size"], c["inputs"]) for c in rates["per_class"]]
        halves = [learned.cifar_scores(name, table, gate, part, columns)
                  for part in ("selection", "report")]  # fmt: skip
        out["halves_ks"][label] = halves_differ(*halves[0], *halves[1], k)
        if label == "default":
            out["resplits"] = resplits(halves, k, len(out[label]["misses"]), splits)
    out["expected_misses"] = expected_interval_misses(sizes, RATE)
    out["oracle"] = oracle_check([n for _, n in sizes], RATE)
    out["classes"] = len(sizes)
    out["class_names"] = list(table.class_names)
    return out


def resplits(
    halves: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, seen: int, splits: int
) -> dict:
    """Per :data:`~bench.alarms.class_resplits.NULL_RULES` rule, over ``splits`` random
    re-splits of both halves' images into a null of the first half's size and judged images:
    the mean number of classes missing, the share of splits where none does (``pass_share``)
    and where at least ``seen`` do (the fixed split's count)."""
    (null, null_classes), (scores, classes) = halves
    everything, their_classes = torch.cat([null, scores]), torch.cat([null_classes, classes])
    out = {"splits": splits}
    for rule, p_values in NULL_RULES.items():
        counts = resplit_misses(everything, their_classes, k, null.numel(), p_values, RATE,
                                splits)  # fmt: skip
        out[rule] = {"mean_misses": float(counts.mean()), "pass_share": float((counts == 0).mean()),
                     "at_least_seen_share": float((counts >= seen).mean())}  # fmt: skip
    return out


def markdown(results: Mapping[str, Mapping]) -> str:
    """Per model: each score's overall rate and the classes that miss, and chance's count."""

    def cell(found: Mapping, names: Sequence[str]) -> str:
        """``rate%: n (class alarms/inputs, ...)``."""
        listed = ", ".join(f"{names[m['class']]} {m['alarms']}/{m['inputs']}"
                           for m in found["misses"])  # fmt: skip
        return f"{100 * found['rate']:.2f}%: {len(found['misses'])}" + (
            f" ({listed})" if listed else ""
        )

    lines = ["| model | default (`learned+knn`): overall, classes missing | energy alone: overall,"
             " classes missing | expected by chance |", "|---|---|---|---:|"]  # fmt: skip
    for name, r in results.items():
        names = r["class_names"]
        lines.append(f"| {name} | {cell(r['default'], names)} | {cell(r['energy'], names)} | "
                     f"{r['expected_misses']:.2f} of {r['classes']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def chance_markdown(results: Mapping[str, Mapping], level: float = HALVES_LEVEL) -> str:
    """Per model: the fixed split's misses against how often the check fails by chance (known
    thresholds; re-splits under each null rule), the classes whose halves differ for both
    scores (KS p-value below ``level``), and the chance that every model passes."""
    lines = ["| model | fixed split: classes missing | known thresholds: expected misses,"
             " P(none) | re-splits, per-class nulls: mean, P(none), P(>= fixed) | re-splits,"
             " pooled / standardised pooled: mean | halves differ, both scores (KS p) |",
             "|---|---:|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        o, rs, names = r["oracle"], r["resplits"], r["class_names"]
        ks = r["halves_ks"]
        differ = [f"{names[c]} ({ks['default'][c]:.2f}, {ks['energy'][c]:.2f})"
                  for c in range(r["classes"])
                  if all(v[c] is not None and v[c] < level for v in ks.values())]  # fmt: skip
        pc = rs["per_class"]
        lines.append(
            f"| {name} | {len(r['default']['misses'])} | {o['expected_misses']:.2f}, "
            f"{o['pass_probability']:.2f} | {pc['mean_misses']:.2f}, {pc['pass_share']:.2f}, "
            f"{pc['at_least_seen_share']:.3f} | {rs['pooled']['mean_misses']:.2f} / "
            f"{rs['standardised']['mean_misses']:.2f} | {', '.join(differ) or 'none'} |"
        )
    every = [np.prod([r["oracle"]["pass_probability"] for r in results.values()]),
             np.prod([r["resplits"]["per_class"]["pass_share"]
                      for r in results.values()])]  # fmt: skip
    return "\n".join(lines) + (f"\n\nEvery model passes: {every[0]:.2f} with known thresholds, "
                               f"{every[1]:.3f} with per-class nulls (re-splits).\n")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.alarms.class_misses",
                                     description=__doc__)  # fmt: skip
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    parser.add_argument("--splits", type=int, default=SPLITS,
                        help="random re-splits per null rule (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.splits)
        log(f"{name}: {len(results[name]['default']['misses'])} classes miss")
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(OUT)
    print(markdown(results))
    print(chance_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
