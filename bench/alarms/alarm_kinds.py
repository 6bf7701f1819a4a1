"""``python -m bench.alarms.alarm_kinds``: what kind of atypicality the default's alarms say on
the shift families (issue 20, item 3), per model and family.

Each model's benchmark table gains the KNN component (:func:`bench.alarms.knn_evidence.
knn_setup`) and the default's evidence, ``learned+knn``, fitted as calibration fits it: on the
choice images (held-out 0..499) and every one of their synthetic shifts. The conformal null is
held-out 500..4,999, per predicted class (pooled where a class has fewer than
``DEFAULT_CLASS_NULL_MIN``), as :func:`bench.alarms.knn_evidence.set_rates` builds it. Every
input of the report part's sets (``bench.alarms.families --n 500``) whose p-value is at most
1% is an alarm; its kind is :func:`surprise_monitor.monitor.atypicality.alarm_kind` of its
tail ranks, as ``report.alarm_kind`` gives it: ``class_evidence``, ``low_level`` or
``features``.

Written: ``results/families/alarm_kinds.json`` (model -> family -> kind -> alarms); printed:
the table ``bench/README.md`` quotes. Options: ``--models`` (the four), ``--n 500``,
``--evidence`` (another variant, to compare; the JSON is written for the default only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from bench.alarms import knn_evidence, learned
from bench.alarms.report import log
from bench.strong_models import ALARM_MODELS
from surprise_monitor.calibrate.evidence_choice import PREFERRED, resolved
from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence
from surprise_monitor.monitor.atypicality import EVIDENCE_VARIANTS, Gate, alarm_kind
from surprise_monitor.monitor.conformal import DEFAULT_CLASS_NULL_MIN, ClassConditionalNull
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS, LearnedEvidence

OUT = Path(__file__).resolve().parent / "results" / "families" / "alarm_kinds.json"
#: The kinds, in the table's order.
KINDS = ("class_evidence", "low_level", "features")
#: The families, in the table's order.
FAMILIES = ("geometry", "photometric", "resolution", "noise", "blur", "contrast", "occlusion",
            "nominal", "semantic", "far")  # fmt: skip
#: The models' names in the table.
LABELS = {"resnet18": "ResNet-18", "vgg_bn": "VGG-BN", "vgg_plain": "VGG (no BN)",
          "mobilenet": "MobileNet"}  # fmt: skip


def run_model(
    name: str, n: int = 500, rate: float = 0.01, evidence: str = PREFERRED
) -> dict[str, dict[str, int]]:
    """Per family, the alarms at nominal ``rate`` of each kind (see the module docstring), with
    the evidence variant ``evidence`` stands for on a table with a KNN bank."""
    _, table, clean, shifted = knn_evidence.knn_setup(name)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None and alarm.gate_threshold is not None
    names = alarm.component_names()
    variant = resolved(evidence, knn=True)
    fit = None
    if variant in LEARNED_VARIANTS:
        fit = fit_learned_evidence(
            clean[0], {s: r for s, (r, _) in shifted.items()}, alarm.reference.rank_floor
        )
    gate = Gate.columns(names, variant, alarm.gate_threshold, fit)

    def columns(found: dict) -> torch.Tensor:
        """A judged set's components with the KNN distance's column."""
        return knn_evidence.knn_columns(table, found)

    null_ranks, null_classes = knn_evidence.null_judgements(name, table, columns)
    null = ClassConditionalNull.of(
        gate.score(null_ranks), null_classes, table.num_classes, DEFAULT_CLASS_NULL_MIN
    )
    out: dict[str, dict[str, int]] = {}
    for _, family, found in knn_evidence.report_sets(name, n):
        ranks = alarm.reference.ranks(columns(found))
        scores = gate.score(ranks)
        p = learned.mondrian_p_values(null, scores, torch.from_numpy(found["classes"]).long())
        counts = out.setdefault(family, dict.fromkeys(KINDS, 0))
        for kind in alarm_kinds(names, ranks, scores, torch.as_tensor(p) <= rate, fit, variant):
            counts[kind] = counts.get(kind, 0) + 1
    return out


def alarm_kinds(
    names: Sequence[str],
    ranks: torch.Tensor,
    scores: torch.Tensor,
    alarmed: torch.Tensor,
    fit: LearnedEvidence | None,
    variant: str,
) -> list[str | None]:
    """The kind of each alarmed input (``alarmed [B]`` bool) from its tail ranks ``[B, J]``
    over components ``names`` and its score, as ``report.alarm_kind`` gives it."""
    return [alarm_kind(names, ranks[i].tolist(), float(scores[i]), fit, variant)
            for i in torch.nonzero(alarmed).flatten().tolist()]  # fmt: skip


def markdown(results: Mapping[str, Mapping[str, Mapping[str, int]]]) -> str:
    """Per model and family: the alarms, then the percentage of each kind (``KINDS``' order)."""
    lines = ["| model | " + " | ".join(FAMILIES) + " |", "|---|" + "---:|" * len(FAMILIES)]
    for name, families in results.items():
        cells = []
        for family in FAMILIES:
            counts = families.get(family, {})
            total = sum(counts.values())
            if not total:
                cells.append("0")
                continue
            shares = " / ".join(f"{100 * counts.get(k, 0) / total:.0f}" for k in KINDS)
            cells.append(f"{total}: {shares}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.alarms.alarm_kinds", description=__doc__)
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--evidence", default=PREFERRED, choices=(*EVIDENCE_VARIANTS, PREFERRED))
    args = parser.parse_args(argv)
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.n, evidence=args.evidence)
        log(f"{name}: {sum(sum(c.values()) for c in results[name].values())} alarms")
    if args.evidence == PREFERRED:
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(OUT)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
