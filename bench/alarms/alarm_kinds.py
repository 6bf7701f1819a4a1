"""``python -m bench.alarms.alarm_kinds``: what kind of atypicality the default's alarms say on
the shift families (issue 20, item 3), per model and family, and whether the semantic sets
differ from CIFAR-10 in their pixels' low-level statistics, with no network at all.

Each model's benchmark table gains the KNN component (:func:`bench.alarms.knn_evidence.
knn_setup`) and the default's evidence, ``learned+knn``, fitted as calibration fits it: on the
choice images (held-out 0..499) and every one of their synthetic shifts. The conformal null is
held-out 500..4,999, per predicted class (pooled where a class has fewer than
``DEFAULT_CLASS_NULL_MIN``), as :func:`bench.alarms.knn_evidence.set_rates` builds it; the
same images' family statistics are the family nulls
(:mod:`surprise_monitor.monitor.families`), as calibration makes them. Every input of the
report part's sets (``bench.alarms.families --n 500``) whose p-value is at most 1% is an
alarm; its kind is the family of its smallest family p-value
(:func:`surprise_monitor.monitor.families.kind_of`), as ``report.alarm_kind`` gives it, and
each family whose p-value is at most 1% as well is counted (an alarm can have several).

The pixel check (:func:`pixel_auroc`): a logistic regression on 19 statistics of the pixels
(per channel mean and spread, mean gradient across and down, four bands of the grey image's
power spectrum, mean saturation, the share of dark and of bright pixels), fitted to tell
CIFAR-10 test images 0..4,999 from a set's selection images, and its AUROC on test images
5,000..9,999 against the set's report images (other Tiny ImageNet classes, other
photographs). Near 0.5: the set's low-level statistics are CIFAR-10's; near 1: they are not,
and a ``low_level`` kind is the truth about those images as well.

The same counts are given for the report part's Tiny ImageNet images whose pixel check scores
below 90% of CIFAR-10's report images (:func:`cifar_like`: new objects whose pixels look like
CIFAR-10's), a column of its own.

Written: ``results/families/alarm_kinds.json`` (``models``: model -> family -> ``alarms``,
``kinds`` and ``significant`` counts; ``pixel_auroc``: set -> AUROC; ``cifar_like_tiny``: how
many Tiny ImageNet images are in that column); printed: the tables
``bench/README.md`` quotes. Options: ``--models`` (the four), ``--n 500``, ``--evidence``
(another variant, to compare; the JSON is written for the default only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.alarms import knn_evidence, learned
from bench.alarms.report import log
from bench.alarms.sets import photo_crops, tinyimagenet_part
from bench.cifar import load_cifar10
from bench.strong_models import ALARM_MODELS
from surprise_monitor.calibrate.evidence_choice import PREFERRED
from surprise_monitor.monitor.atypicality import EVIDENCE_VARIANTS
from surprise_monitor.monitor.conformal import DEFAULT_CLASS_NULL_MIN, ClassConditionalNull
from surprise_monitor.monitor.families import (
    FAMILIES,
    FamilyNulls,
    family_columns,
    family_statistics,
    kind_of,
)

OUT = Path(__file__).resolve().parent / "results" / "families" / "alarm_kinds.json"
#: The kinds, in the table's order.
KINDS = FAMILIES
#: The report part's Tiny ImageNet images whose pixels look like CIFAR-10's (:func:`cifar_like`).
CIFAR_LIKE = "tiny, CIFAR-like pixels"
#: The shift families, in the table's order.
SHIFTS = ("geometry", "photometric", "resolution", "noise", "blur", "contrast", "occlusion",
          "nominal", "semantic", CIFAR_LIKE, "far")  # fmt: skip
#: The models' names in the table.
LABELS = {"resnet18": "ResNet-18", "vgg_bn": "VGG-BN", "vgg_plain": "VGG (no BN)",
          "mobilenet": "MobileNet"}  # fmt: skip
#: CIFAR-10 test images of each part for the pixel check.
CIFAR_PARTS = {"selection": slice(0, 5000), "report": slice(5000, 10000)}

Counts = dict[str, dict[str, int]]


def run_model(
    name: str,
    n: int = 500,
    rate: float = 0.01,
    evidence: str = PREFERRED,
    tiny_cifar_like: np.ndarray | None = None,
) -> dict:
    """Per shift family, the alarms at nominal ``rate`` (``alarms``), how many of each kind
    (``kinds``) and how many with each family's p-value at most ``rate`` (``significant``), with
    the evidence variant ``evidence`` stands for on a table with a KNN bank; with
    ``tiny_cifar_like`` (``[n]`` bool over the report part's Tiny ImageNet images:
    :func:`cifar_like`) the same of those images under :data:`CIFAR_LIKE`."""
    table, gate, _ = knn_evidence.default_gate(name, evidence)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None
    names = alarm.component_names()
    columns = family_columns(names)

    def with_knn(found: dict) -> torch.Tensor:
        """A judged set's components with the KNN distance's column."""
        return knn_evidence.knn_columns(table, found)

    null_ranks, null_classes = knn_evidence.null_judgements(name, table, with_knn)
    null = ClassConditionalNull.of(
        gate.score(null_ranks), null_classes, table.num_classes, DEFAULT_CLASS_NULL_MIN
    )
    families = FamilyNulls.of(family_statistics(null_ranks, columns))
    out: dict[str, dict] = {}
    for set_name, shift, found in knn_evidence.report_sets(name, n):
        ranks = alarm.reference.ranks(with_knn(found))
        p = learned.mondrian_p_values(
            null, gate.score(ranks), torch.from_numpy(found["classes"]).long()
        )
        family_p = families.p_values(family_statistics(ranks, columns))
        tally(out.setdefault(shift, empty_counts()), p, family_p, ranks, columns, rate)
        if set_name == "tinyimagenet" and tiny_cifar_like is not None:
            assert len(tiny_cifar_like) == len(p), "the judged set is not the pixel check's"
            keep = torch.from_numpy(tiny_cifar_like)
            counts = out.setdefault(CIFAR_LIKE, empty_counts())
            tally(counts, p[tiny_cifar_like], family_p[keep], ranks[keep], columns, rate)
    return out


def empty_counts() -> dict:
    """A shift family's counts before any alarm: ``alarms``, ``kinds``, ``significant``."""
    return {"alarms": 0, "kinds": dict.fromkeys(KINDS, 0), "significant": dict.fromkeys(KINDS, 0)}


def tally(
    counts: dict,
    p: np.ndarray,
    family_p: torch.Tensor,
    ranks: torch.Tensor,
    columns: Sequence[Sequence[int]],
    rate: float,
) -> None:
    """Add to ``counts`` (:func:`empty_counts`) the inputs whose p-value ``p [B]`` is at most
    ``rate``: their kinds from ``family_p [B, F]`` (ties by ``ranks [B, J]`` over each
    family's ``columns``), and each family whose p-value is at most ``rate`` as well."""
    for i in np.flatnonzero(p <= rate).tolist():
        kind = kind_of(family_p[i].tolist(), ranks[i].tolist(), columns)
        counts["alarms"] += 1
        if kind is not None:
            counts["kinds"][kind] += 1
        for f, family in enumerate(KINDS):
            counts["significant"][family] += int(float(family_p[i, f]) <= rate)


def pixel_statistics(images: np.ndarray) -> np.ndarray:
    """``[n, 19]`` low-level statistics of uint8 ``[n, 32, 32, 3]`` images (see the module
    docstring)."""
    x = images.astype(np.float32) / 255.0
    grey = x.mean(axis=3)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2
    half = grey.shape[1] // 2
    yy, xx = np.mgrid[-half:half, -half:half]
    radius = np.hypot(yy, xx)
    bands = [power[:, (radius >= a) & (radius < b)].mean(axis=1)
             for a, b in ((1, 3), (3, 6), (6, 10), (10, 16))]  # fmt: skip
    top, bottom = x.max(axis=3), x.min(axis=3)
    return np.concatenate([
        x.mean(axis=(1, 2)), x.std(axis=(1, 2)),
        np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)), np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)),
        np.log(np.stack(bands, axis=1) + 1e-8),
        ((top - bottom) / (top + 1e-3)).mean(axis=(1, 2))[:, None],
        (x <= 0.02).mean(axis=(1, 2, 3))[:, None], (x >= 0.98).mean(axis=(1, 2, 3))[:, None],
    ], axis=1)  # fmt: skip


def pixel_check(images: Mapping[str, np.ndarray], cifar: np.ndarray) -> dict[str, np.ndarray]:
    """The pixel check (module docstring), fitted on ``images["selection"]`` against CIFAR-10
    test images 0..4,999 (``cifar``: all 10,000): its scores (higher: less like CIFAR-10) of
    ``images["report"]`` (``"set"``) and of test images 5,000..9,999 (``"cifar"``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ours, theirs = cifar[CIFAR_PARTS["selection"]], images["selection"]
    x = np.concatenate([pixel_statistics(ours), pixel_statistics(theirs)])
    y = np.r_[np.zeros(len(ours)), np.ones(len(theirs))]
    fit = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
    )
    fit.fit(x, y)
    return {
        "set": fit.decision_function(pixel_statistics(images["report"])),
        "cifar": fit.decision_function(pixel_statistics(cifar[CIFAR_PARTS["report"]])),
    }


def pixel_auroc(scores: Mapping[str, np.ndarray]) -> float:
    """The AUROC of :func:`pixel_check`'s scores: the set's report images against CIFAR-10's."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(scores["cifar"])), np.ones(len(scores["set"]))]
    return float(roc_auc_score(y, np.concatenate([scores["cifar"], scores["set"]])))


def cifar_like(scores: Mapping[str, np.ndarray], share: float = 0.9) -> np.ndarray:
    """Which of the set's report images score below ``share`` of CIFAR-10's report images in
    :func:`pixel_check`: pixels as CIFAR-10-like as most of CIFAR-10's own."""
    return scores["set"] <= np.quantile(scores["cifar"], share)


def semantic_pixel_checks(n: int = 500) -> dict[str, dict[str, np.ndarray]]:
    """:func:`pixel_check` of the two semantic sets, ``n`` images of each part."""
    cifar = load_cifar10("test").images
    sets = {
        "tinyimagenet": {p: tinyimagenet_part(p, n)[0] for p in CIFAR_PARTS},
        "photos": {p: photo_crops(p, n) for p in CIFAR_PARTS},
    }
    return {name: pixel_check(images, cifar) for name, images in sets.items()}


def markdown(results: Mapping[str, Mapping[str, Mapping]], key: str = "kinds") -> str:
    """Per model and shift family: the alarms, then the percentage of them of each kind
    (``key="kinds"``) or with each family's p-value at most the rate (``"significant"``), in
    :data:`KINDS`' order."""
    lines = ["| model | " + " | ".join(SHIFTS) + " |", "|---|" + "---:|" * len(SHIFTS)]
    for name, shifts in results.items():
        cells = []
        for shift in SHIFTS:
            counts = shifts.get(shift, {"alarms": 0})
            total = counts["alarms"]
            if not total:
                cells.append("0")
                continue
            shares = " / ".join(f"{100 * counts[key][k] / total:.0f}" for k in KINDS)
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
    checks = semantic_pixel_checks(args.n)
    pixels = {name: round(pixel_auroc(scores), 3) for name, scores in checks.items()}
    like = cifar_like(checks["tinyimagenet"])
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.n, evidence=args.evidence, tiny_cifar_like=like)
        log(f"{name}: {results[name]['semantic']['alarms']} semantic alarms")
    if args.evidence == PREFERRED:
        tmp = OUT.with_suffix(".tmp")
        found = {"models": results, "pixel_auroc": pixels, "cifar_like_tiny": int(like.sum())}
        tmp.write_text(json.dumps(found, indent=1) + "\n")
        tmp.replace(OUT)
    print("Kinds (class_evidence / low_level / features, % of alarms):\n")
    print(markdown(results))
    print("Family p-value at most the rate (% of alarms; an alarm can count in several):\n")
    print(markdown(results, "significant"))
    print(
        "Pixel statistics alone, AUROC against CIFAR-10: "
        + ", ".join(f"{k} {v:.3f}" for k, v in pixels.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
