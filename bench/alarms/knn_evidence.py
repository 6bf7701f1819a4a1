"""``python -m bench.alarms.knn_evidence``: a nearest-neighbour distance in the gated score's
class evidence, measured on the benchmark before the library computes it (issue 20: a lead).

The component is KNN's score (Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"; pytorch-ood's ``KNN``): the Euclidean distance from an input's L2-normalised
penultimate features (the classifier's input) to the ``k``-th nearest of the normalised features
of training images ``0..M-1``. It is read as an upper tail rank among the same distances of
training images ``M..2M-1`` (the library's exponential tail,
:func:`~surprise_monitor.monitor.tails.exponential_tail_ranks`). ``M`` = 10,000 is the size of
the gated table's reference; ``k`` = 10 is the paper's 50 for 50,000 CIFAR-10 images scaled to
the bank. Each benchmark table's gate stays in front; behind it the class evidence is Fisher's
sum of energy's rank (``energy+knn``), or of energy's and the expectation mass's
(``energy+mass+knn``), and the KNN rank at weight ``w`` (:data:`WEIGHTS`).

Per model (its benchmark table, the gated score, as ``bench.alarms.learned`` reads it): both
parts' sets of ``bench.alarms.families`` (cached: run it first), against the part's CIFAR-10
images (the selection part's without the first 500, which calibration's choice takes), with
:mod:`bench.alarms.loo`'s checks. The baselines' and the library's variants' AUROCs on the same
sets are ``results/learned.json``'s (run ``bench.alarms.learned`` first). And what
``evidence="auto"`` would see: every variant's margin on each synthetic shift of the choice
images (test images 0..499; their penultimate features taken by a hook, in the batches
calibration uses; the learned variants' cross-fitted as the library's choice does), and the
variant each of three rules would pick (:data:`RULES`: the library's and two hypotheses).

Written: ``results/knn_evidence.json``; printed: the Markdown summary for ``bench/README.md``.
Options: ``--models`` (the four), ``--n 200`` (the families' set size).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.alarms import collect, learned, loo
from bench.alarms.report import log
from bench.cifar import load_cifar10, to_tensor
from bench.strong_models import ALARM_MODELS, HELDOUT
from surprise_monitor.calibrate.evidence_choice import (
    CHOICE_IMAGES,
    SHIFTS,
    highest_worst,
    learned_margins,
    shift_margins,
)
from surprise_monitor.monitor.atypicality import GATE_OFFSET, GATED_SCORE_NAME, Gate, fisher
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS
from surprise_monitor.monitor.tails import exponential_tail_ranks

HERE = Path(__file__).resolve().parent
#: Training images in the bank, and as many after them for the reference distances.
BANK = 10_000
#: The neighbour whose distance is the score.
NEIGHBOUR = 10
#: New variant -> the library's evidence variant whose Fisher sum the KNN rank joins.
VARIANTS = {"energy+knn": "energy", "energy+mass+knn": "energy+mass"}
#: The KNN rank's weights in the Fisher sum.
WEIGHTS = (0.5, 1.0)
#: The AUROCs read from ``results/learned.json`` beside the new ones.
KEPT = ("MSP", "MaxLogit", "Energy", "Mahalanobis", "KNN", "energy", "energy+mass",
        "learned, family held out", "learned+mass, family held out")  # fmt: skip
_CHUNK = 1000


@dataclass(frozen=True)
class KnnRank:
    """The KNN component: a bank of normalised features, the ``k``-th neighbour, and the
    sorted reference distances the tail ranks are read against."""

    bank: torch.Tensor  # [M, D] float32, rows of unit length
    reference: torch.Tensor  # [m] float32, ascending
    k: int

    @classmethod
    def fit(cls, features: torch.Tensor, size: int = BANK, k: int = NEIGHBOUR) -> KnnRank:
        """Bank ``features[:size]``; reference: the distances of ``features[size:2 size]``."""
        if len(features) < 2 * size or not 1 <= k <= size:
            raise ValueError(f"need 2 x {size} feature rows and 1 <= k <= {size}")
        bank = torch.nn.functional.normalize(features[:size].float(), dim=1)
        fitted = cls(bank, torch.zeros(1), k)
        reference = torch.sort(fitted.distances(features[size : 2 * size])).values
        return cls(bank, reference.contiguous(), k)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` distances from the normalised ``features [B, D]`` to their ``k``-th nearest
        bank row (from the cosine similarity: ``sqrt(2 - 2 s)``)."""
        z = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1)
        out = []
        for s in range(0, len(z), _CHUNK):
            kth = (z[s : s + _CHUNK] @ self.bank.T).topk(self.k, dim=1).values[:, -1]
            out.append((2.0 - 2.0 * kth).clamp_min(0.0).sqrt())
        return torch.cat(out) if out else torch.zeros(0)

    def ranks(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` upper tail ranks of the distances among the reference's."""
        return exponential_tail_ranks(self.reference, self.distances(features))


def label(variant: str, weight: float) -> str:
    """A new score's name: ``"energy+knn w1"``."""
    return f"{variant} w{weight:g}"


LABELS = tuple(label(v, w) for v in VARIANTS for w in WEIGHTS)


def gated_scores(
    gates: Mapping[str, Gate], ranks: torch.Tensor, knn_ranks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every new score of inputs with component ``ranks [B, J]`` and KNN ranks ``[B]``: the
    gate's statistic plus :data:`GATE_OFFSET` where it opens, else the base variant's Fisher
    statistic plus ``w`` times the KNN rank's (float64). ``gates``: base variant -> gate."""
    out = {}
    for variant, base in VARIANTS.items():
        gate = gates[base]
        stat = gate.statistic(ranks).double()
        evidence = gate.evidence_statistic(ranks).double()
        knn = fisher(knn_ranks.double()[:, None])
        for w in WEIGHTS:
            score = evidence + w * knn
            out[label(variant, w)] = torch.where(stat >= gate.threshold, stat + GATE_OFFSET, score)
    return out


def choice_features(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The penultimate features of the choice ``images``, clean (``"clean"``) and under each
    synthetic shift, in :data:`bench.alarms.collect.BATCH` batches (as the judgements were)."""
    captured: list[torch.Tensor] = []
    hook = collect.head_of(model).register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().float())
    )
    out = {}
    try:
        with torch.no_grad():
            for key, shift in {"clean": lambda v: v, **SHIFTS}.items():
                captured.clear()
                for s in range(0, len(images), collect.BATCH):
                    model(shift(images[s : s + collect.BATCH]))
                out[key] = torch.cat(captured)
    finally:
        hook.remove()
    return out


#: The rules ``auto`` could follow, each picking a variant from its synthetic margins: the
#: library's (the highest worst margin), and two that reward more than the worst shift: among
#: the variants whose worst margin is within the issue's tolerance for such sets
#: (``loo.OTHER_TOLERANCE``), the highest mean margin, or the most shifts won (ties: the mean).
RULES = ("worst", "tolerance, then mean", "tolerance, then wins")


def pick(margins: Mapping[str, Mapping[str, float]], rule: str) -> str:
    """The variant ``rule`` (one of :data:`RULES`) picks; ties go to the first listed."""
    worst = {k: min(m.values()) for k, m in margins.items()}
    if rule == RULES[0]:  # the library's own
        return highest_worst(worst)
    mean = {k: sum(m.values()) / len(m) for k, m in margins.items()}
    wins = {k: sum(v > 0 for v in m.values()) for k, m in margins.items()}
    ok = {k for k in margins if worst[k] >= -loo.OTHER_TOLERANCE} or set(margins)
    second = {k: (wins[k], round(mean[k], 9)) for k in margins}
    key = {k: (k in ok, *((round(mean[k], 9),) if rule == RULES[1] else second[k]))
           for k in margins}  # fmt: skip
    order = list(margins)
    return max(order, key=lambda k: (*key[k], -order.index(k)))


def run_model(name: str, n: int = 200) -> dict:
    """Both parts' AUROCs of the new scores (see the module docstring), every variant's
    margin on each synthetic shift of the choice images, and each rule's pick."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log, GATED_SCORE_NAME)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None and alarm.gate_threshold is not None
    names, threshold = alarm.component_names(), alarm.gate_threshold
    gates = {v: Gate.columns(names, v, threshold) for v in (*learned.FIXED, *VARIANTS.values())}
    knn = KnnRank.fit(torch.from_numpy(collect.train_features(name, model)[0]))

    def scores(found: dict[str, np.ndarray], family: str | None) -> dict[str, np.ndarray]:
        """The new scores of a judged set."""
        ranks = alarm.reference.ranks(torch.from_numpy(found["components"]).float())
        knn_ranks = knn.ranks(torch.from_numpy(found["features"]))
        return {k: v.numpy() for k, v in gated_scores(gates, ranks, knn_ranks).items()}

    parts = {part: learned._part(name, n, part, scores) for part in learned.PARTS}
    clean, shifted = learned.choice_judgements(name, model, table)
    test = load_cifar10("test")
    x = to_tensor(test.images[HELDOUT.start : HELDOUT.start + CHOICE_IMAGES])
    feats = choice_features(model, x)
    judged = {"clean": clean[0], **{s: r for s, (r, _) in shifted.items()}}
    new = {}
    for k, r in judged.items():
        new[k] = {v: gates[v].score(r.float()) for v in learned.FIXED}
        new[k].update(gated_scores(gates, r.float(), knn.ranks(feats[k])))
    margins = shift_margins(
        new["clean"],
        {s: new[s] for s in SHIFTS},
        clean[1],
        {s: lg for s, (_, lg) in shifted.items()},
    )
    floor = alarm.reference.rank_floor
    margins.update(learned_margins(names, threshold, clean, shifted, floor))
    aurocs = {p: {s: {k: v["auroc"] for k, v in info["scores"].items()}
                  for s, info in sets.items()} for p, sets in parts.items()}  # fmt: skip
    return {"model": name, "n": n, "bank": BANK, "k": NEIGHBOUR, "aurocs": aurocs,
            "margins": margins, "picks": {rule: pick(margins, rule) for rule in RULES}}  # fmt: skip


def merged(result: dict, library: dict) -> dict[str, dict[str, dict[str, float]]]:
    """part -> set -> score -> AUROC: the new scores' and :data:`KEPT`'s from
    ``results/learned.json``'s model entry ``library``."""
    out: dict = {}
    for part, sets in result["aurocs"].items():
        out[part] = {}
        for s, new in sets.items():
            kept = library["parts"][part][s]["scores"]
            out[part][s] = {**{k: kept[k]["auroc"] for k in KEPT}, **new}
    return out


def checks(aurocs: Mapping[str, Mapping[str, float]], family_of: Mapping[str, str], score: str,
           model: str) -> dict:  # fmt: skip
    """:func:`bench.alarms.loo.summary` of ``score`` over one part's sets, with the worst set's
    margin plus tolerance (``slack``) and the MNIST family's minimum."""
    rows = [{"model": model, **loo.set_report(a, score, s, family_of[s])}
            for s, a in aurocs.items()]  # fmt: skip
    out = loo.summary(rows)
    out["slack"] = min(r["margin"] + r["tolerance"] for r in rows if r["tolerance"] is not None)
    out["mnist_min"] = min(r["auroc"] for r in rows if r["mnist_ok"] is not None)
    return out


def _verdicts(both: dict, family_of: Mapping[str, str], score: str, model: str) -> list[str]:
    """Each part's ``beats / slack / MNIST min / passed`` of ``score`` (``both``:
    :func:`merged`'s AUROCs)."""
    cells = []
    for part in learned.PARTS:
        c = checks(both[part], family_of, score, model)
        cells.append(f"{c['beats']} / {c['slack']:+.3f} / {c['mnist_min']:.3f} / "
                     f"{'yes' if c['passed'] else 'no'}")  # fmt: skip
    return cells


def markdown(results: Mapping[str, dict], library: Mapping[str, dict]) -> str:
    """Per model and score, each part's beats, slack, MNIST minimum and verdict; each
    variant's worst / mean margin and shifts won on the choice images; what each rule picks."""
    lines = ["| model | score | selection: beats / slack / MNIST min / passed | "
             "report: beats / slack / MNIST min / passed |", "|---|---|---|---|"]  # fmt: skip
    both = {name: merged(result, library[name]) for name, result in results.items()}
    family_of = {s: i["family"] for r in library.values() for s, i in r["parts"]["report"].items()}
    for name in results:
        for score in (*KEPT[5:], *LABELS):
            cells = _verdicts(both[name], family_of, score, name)
            lines.append(f"| {name} | {score} | {cells[0]} | {cells[1]} |")
    variants = list(next(iter(results.values()))["margins"])
    lines += ["", "| model | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, result in results.items():
        cells = []
        for v in variants:
            m = list(result["margins"][v].values())
            won = sum(x > 0 for x in m)
            cells.append(f"{min(m):+.3f} / {sum(m) / len(m):+.3f} / {won}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | rule | picks | selection | report |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for rule, chosen in result["picks"].items():
            score = f"{chosen}{learned.HELD_OUT}" if chosen in LEARNED_VARIANTS else chosen
            cells = _verdicts(both[name], family_of, score, name)
            lines.append(f"| {name} | {rule} | {chosen} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.alarms.knn_evidence", description=__doc__
    )
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    library = json.loads((HERE / "results" / "learned.json").read_text())
    results = {name: run_model(name, args.n) for name in args.models.split(",")}
    out = HERE / "results" / "knn_evidence.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)
    print(markdown(results, library))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
