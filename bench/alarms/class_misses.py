"""``python -m bench.alarms.class_misses``: which predicted classes' alarm rate at nominal 1%
leaves 1% out of its exact 95% interval (issue 20's per-class check), for the default and for
energy alone on the same nulls and images, against how many chance alone would give.

Per model (the four of ``bench.strong_models.ALARM_MODELS``): the benchmark table with its KNN
component, the default's evidence (``learned+knn``, fitted as calibration fits it:
:func:`bench.alarms.knn_evidence.default_gate`) and ``energy`` (the one-line logit baseline as
the gated score's class evidence); the report part's CIFAR-10 images against per-class nulls of
held-out images 500..4,999 (:func:`bench.alarms.learned.alarm_rates`, the monitor's
interpolated p-values). A class whose rate's interval leaves out 1% for both scores is a class
whose report images differ from its null images, whatever the score. The expected number of
such classes for exchangeable inputs counts the null's draw as well as the binomial one
(:func:`bench.alarms.class_rates.expected_interval_misses`).

Written: ``results/class_misses.json``; printed: the table ``bench/README.md`` quotes.
Options: ``--models``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.alarms import knn_evidence, learned
from bench.alarms.class_rates import expected_interval_misses
from bench.alarms.report import log
from bench.strong_models import ALARM_MODELS
from surprise_monitor.monitor.atypicality import Gate

OUT = Path(__file__).resolve().parent / "results" / "class_misses.json"
RATE = 0.01
#: The scores compared: the default's evidence and energy alone.
SCORES = ("default", "energy")


def misses(per_class: Sequence[Mapping], rate: float = RATE) -> list[dict]:
    """The classes of ``learned.alarm_rates``' per-class entries whose exact 95% interval
    leaves out ``rate``: class, alarms, inputs."""
    return [{"class": c["class"], "alarms": c["alarms"], "inputs": c["inputs"]}
            for c in per_class if not c["ci_low"] <= rate <= c["ci_high"]]  # fmt: skip


def run_model(name: str) -> dict:
    """Both scores' overall rate and missing classes, and the misses chance gives."""
    table, default, _ = knn_evidence.default_gate(name)
    alarm = table.alarm
    assert alarm is not None and alarm.gate_threshold is not None
    energy = Gate.columns(alarm.component_names(), "energy", alarm.gate_threshold)

    def columns(found: dict):
        """A judged set's components with the KNN distance's column."""
        return knn_evidence.knn_columns(table, found)

    out: dict = {}
    for label, gate in zip(SCORES, (default, energy), strict=True):
        rates = learned.alarm_rates(name, table, gate, RATE, columns)
        out[label] = {"rate": rates["overall"]["rate"], "misses": misses(rates["per_class"])}
        sizes = [(c["null_size"], c["inputs"]) for c in rates["per_class"]]
    out["expected_misses"] = expected_interval_misses(sizes, RATE)
    out["classes"] = len(sizes)
    out["class_names"] = list(table.class_names)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.alarms.class_misses",
                                     description=__doc__)  # fmt: skip
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    args = parser.parse_args(argv)
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name)
        log(f"{name}: {len(results[name]['default']['misses'])} classes miss")
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(OUT)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
