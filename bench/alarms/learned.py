"""``python -m bench.alarms.learned``: the gated score's ``learned`` class evidence (issue 20)
on the benchmark's models, fitted as calibration fits it, and held out the honest way.

For each model: its benchmark table (:func:`bench.alarms.collect.table_of`, the gated score at
the default gate level, its evidence chosen by ``auto`` among the fixed variants) judges the
first :data:`~surprise_monitor.calibrate.evidence_choice.CHOICE_IMAGES` held-out images (test
images 0..499, the images calibration's choice takes) as they are and under every synthetic
shift of :data:`~surprise_monitor.calibrate.evidence_choice.SHIFTS` (cached under
``alarms/MODEL/learned/TABLE_KIND/``). From their component ranks:

- ``learned`` and ``learned+mass``: the library's fit
  (:func:`surprise_monitor.calibrate.evidence_fit.fit_learned_evidence`) on every shift, as
  ``AlarmOptions(evidence="learned")`` makes it;
- ``..., family held out``: for each benchmark set of a family the synthetic shifts cover
  (geometry, photometric, contrast, blur, noise, resolution, occlusion), the fit *without* the
  synthetic shifts of that family (:data:`FAMILY_OF`): a kind of shift the fit never saw; the
  semantic, far and nominal sets are scored by the fit on every shift;
- ``table's evidence``: the table's own variant (what ``auto`` chose among the fixed ones);
- the baselines (:class:`bench.alarms.scores.Baselines`) on the same images;

each on the judged sets of ``bench.alarms.families`` (cached: run it first) of both parts,
against that part's CIFAR-10 images (the selection part's without the first 500, which the
fits saw; the ``nominal`` sets against the same images unshifted), with
:mod:`bench.alarms.loo`'s checks and summary per model on the report part. **The learned
rank's weight** in the evidence's Fisher sum (``RANK_WEIGHT``) is chosen by
:func:`bench.alarms.loo.leave_one_model_out` among the fixed variants and the learned ones at
each of :data:`WEIGHTS` (family held out): on the other models' selection part, reported on
the held-out model's report part (:func:`weight_rotations`). Also what
``evidence="auto"`` would choose with ``learned`` among the candidates, from the same judged
choice images (:func:`surprise_monitor.calibrate.evidence_choice.choose`, cross-fitted margins).

Written: ``results/learned.json``; printed: the Markdown summary for ``bench/README.md``.
Options: ``--models resnet18,vgg_bn,vgg_plain,mobilenet``, ``--n 200`` (the families' set size).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.alarms import collect, loo
from bench.alarms.report import log
from bench.alarms.scores import Baselines, alarm_rate, detection
from bench.alarms.sets import base_rows, cache_stem
from bench.cifar import load_cifar10, to_tensor
from bench.strong_models import ALARM_MODELS, HELDOUT
from surprise_monitor.calibrate.evidence_choice import (
    CHOICE_IMAGES,
    SHIFT_FAMILIES,
    SHIFTS,
    choose,
    learned_variants,
)
from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME, KNN_VARIANTS, Gate
from surprise_monitor.monitor.conformal import (
    DEFAULT_CLASS_NULL_MIN,
    ClassConditionalNull,
    ConformalNull,
)
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS, LearnedEvidence
from surprise_monitor.monitor.table import CalibrationTable

HERE = Path(__file__).resolve().parent
FAMILIES_RESULTS = HERE / "results" / "families" / "gated"
#: Benchmark family -> the synthetic shifts' family (``SHIFT_FAMILIES``) left out of its fit.
FAMILY_OF = {
    "geometry": "geometry", "photometric": "colour", "contrast": "contrast", "blur": "blur",
    "noise": "noise", "resolution": "resolution", "occlusion": "occlusion",
}  # fmt: skip
TABLE = "table's evidence"
HELD_OUT = ", family held out"
#: The learned variants of this module's tables (without the KNN component, which
#: :mod:`bench.alarms.knn_evidence` adds).
LEARNED = tuple(v for v in LEARNED_VARIANTS if v not in KNN_VARIANTS)
#: The scores reported: the table's variant, then each learned variant fitted on every shift
#: and with the set's family held out.
SCORES = (TABLE, *(v + h for v in LEARNED for h in ("", HELD_OUT)))
#: The fixed evidence variants (no fit).
FIXED = ("energy", "energy+mass")
#: The learned rank's weights the leave-one-model-out chooses among.
WEIGHTS = (0.25, 0.5, 1.0)
PARTS = ("selection", "report")

Judged = tuple[torch.Tensor, torch.Tensor]  # (component ranks [B, J], logits [B, K])


def choice_judgements(
    name: str, model: torch.nn.Module, table: CalibrationTable
) -> tuple[Judged, dict[str, Judged]]:
    """The choice images' ``(ranks, logits)``, clean and per shift (cached)."""
    kind = collect.table_kind(GATED_SCORE_NAME)
    path = collect.folder(name) / "learned" / kind / f"choice{CHOICE_IMAGES}.npz"
    found: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as d:
            found = {k: d[k] for k in d.files}
    todo = {k: f for k, f in {"clean": lambda v: v, **SHIFTS}.items() if f"{k}.ranks" not in found}
    if todo:  # shifts added since the cache was made
        test = load_cifar10("test")
        x = to_tensor(test.images[HELDOUT.start : HELDOUT.start + CHOICE_IMAGES])
        with SurpriseMonitor(model, table) as monitor:
            for key, shift in todo.items():
                r = [
                    monitor.inspect(shift(x[s : s + collect.BATCH]))
                    for s in range(0, len(x), collect.BATCH)
                ]
                found[f"{key}.ranks"] = torch.cat([p.component_ranks for p in r]).numpy()
                found[f"{key}.logits"] = torch.cat([p.logits for p in r]).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        collect._save(path, **found)
    got = {k: torch.from_numpy(v) for k, v in found.items()}
    clean = (got["clean.ranks"], got["clean.logits"])
    return clean, {s: (got[f"{s}.ranks"], got[f"{s}.logits"]) for s in SHIFTS}


def fits(
    clean: Judged, shifted: Mapping[str, Judged], floor: float
) -> dict[str | None, LearnedEvidence]:
    """The fit on every shift (key ``None``) and, per synthetic family, without its shifts."""
    out: dict[str | None, LearnedEvidence] = {}
    for family in [None, *sorted(set(SHIFT_FAMILIES.values()))]:
        kept = {s: r for s, (r, _) in shifted.items() if SHIFT_FAMILIES[s] != family}
        out[family] = fit_learned_evidence(clean[0], kept, floor)
    return out


def run_model(
    name: str, n: int = 200, say: Callable[[str], None] = log, weights: Sequence[float] = WEIGHTS
) -> dict:
    """Every figure of one model (see the module docstring): both parts' sets, each scored by
    the table's variant, the fixed variants, the learned ones (all shifts and family held out)
    and, for the leave-one-model-out on the rank's weight, the learned ones with the family held
    out at each of ``weights``."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, say, GATED_SCORE_NAME)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None and alarm.gate_threshold is not None
    clean, shifted = choice_judgements(name, model, table)
    floor = alarm.reference.rank_floor
    names, threshold = alarm.component_names(), alarm.gate_threshold
    chosen, worst = choose(names, threshold, clean, shifted, floor)
    gates = _gates(names, threshold, fits(clean, shifted, floor), weights)
    table_gate = alarm.gate()
    assert table_gate is not None
    baselines = Baselines(*collect.train_features(name, model))

    def scores(found: dict[str, np.ndarray], family: str | None) -> dict[str, np.ndarray]:
        """The library scores (the held-out fits for ``family``) and the baselines."""
        ranks = alarm.reference.ranks(torch.from_numpy(found["components"]).float())
        out = {TABLE: table_gate.score(ranks)}
        out.update({v: Gate.columns(names, v, threshold).score(ranks) for v in FIXED})
        for (label, fit), gate in gates.items():
            if fit == family or (fit is None and label in LEARNED_VARIANTS):
                out[label] = gate.score(ranks)
        out = {k: v.double().numpy() for k, v in out.items()}
        out.update(baselines.scores(found))
        return out

    parts = {part: _part(name, n, part, scores) for part in PARTS}
    say(f"{name}: {len(parts['report'])} report sets; auto would choose {chosen}")
    if chosen in LEARNED_VARIANTS:
        auto_gate = gates[(chosen, None)]  # fitted on every shift, as calibration fits it
    else:
        auto_gate = Gate.columns(names, chosen, threshold)
    rates = alarm_rates(name, table, auto_gate)
    return {"model": name, "n": n, "table_evidence": alarm.evidence, "auto_choice": chosen,
            "worst_margin": worst, "sets": parts["report"], "parts": parts,
            "alarm_rates": {"variant": chosen, **rates}}  # fmt: skip


def _gates(
    names: Sequence[str],
    threshold: float,
    fitted: Mapping[str | None, LearnedEvidence],
    weights: Sequence[float],
) -> dict[tuple[str, str | None], Gate]:
    """``(score label, fit's held-out family)`` -> gate: each learned variant components
    ``names`` serve at the library's rank weight on every fit (the label without or with
    :data:`HELD_OUT`), and at each of ``weights`` on the held-out fits (:func:`weight_label`)."""
    out = {}
    variants = learned_variants(names)
    for family, e in fitted.items():
        for v in variants:
            # the fit on every shift serves the sets of no synthetic family as "held out" too
            labels = [v + HELD_OUT] if family is not None else [v, v + HELD_OUT]
            for label in labels:
                out[(label, family)] = Gate.columns(names, v, threshold, e)
            for w in weights:
                weighted = replace(e, rank_weight=w)
                out[(weight_label(v, w), family)] = Gate.columns(names, v, threshold, weighted)
    return out


def weight_label(variant: str, weight: float) -> str:
    """The label of a learned variant at rank weight ``weight``, its family held out."""
    return f"{variant} w{weight:g}{HELD_OUT}"


def part_scores(
    name: str, n: int, part: str, scores: Callable[[dict[str, np.ndarray], str | None], dict]
) -> dict[str, tuple[str, dict, dict]]:
    """One part's sets: set -> (its family, the per-image scores of its reference, its own):
    the reference the part's CIFAR-10 images (of the selection part without the first
    ``CHOICE_IMAGES``, which the fits saw); for the ``nominal`` sets the same images unshifted,
    image for image."""
    kind = collect.table_kind(GATED_SCORE_NAME)
    meta = json.loads((FAMILIES_RESULTS / f"{name}.json").read_text())["parts"][part]["sets"]
    inlier = collect.load_judged(collect.folder(name) / "sets" / kind / f"{part}__cifar10.npz")
    unseen = {k: v[CHOICE_IMAGES:] if part == "selection" else v for k, v in inlier.items()}
    sets: dict = {}
    for set_name, info in meta.items():
        family = FAMILY_OF.get(info["family"])
        file = f"{cache_stem(part, set_name)}.npz"
        found = collect.load_judged(collect.folder(name) / "families" / kind / f"n{n}" / file)
        if info["family"] == loo.NOMINAL:  # the same images, unshifted
            same = {k: v[base_rows(part, len(found["score"]))] for k, v in inlier.items()}
            reference = scores(same, family)
        else:
            reference = scores(unseen, family)
        sets[set_name] = (info["family"], reference, scores(found, family))
    return sets


def detections(found: Mapping[str, tuple[str, dict, dict]]) -> dict:
    """:func:`part_scores`' sets as family and every score's AUROC / FPR95 against the set's
    reference."""
    return {s: {"family": f, "scores": detection(r, x)} for s, (f, r, x) in found.items()}


def _part(
    name: str, n: int, part: str, scores: Callable[[dict[str, np.ndarray], str | None], dict]
) -> dict:
    """One part's sets (:func:`part_scores`), as :func:`detections`."""
    return detections(part_scores(name, n, part, scores))


def cifar_scores(
    name: str,
    table: CalibrationTable,
    gate: Gate,
    part: str,
    columns: Callable[[dict[str, np.ndarray]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate``'s scores (over ``table``'s reference) of a part's judged CIFAR-10 images and
    their predicted classes; the selection part's without the first :data:`CHOICE_IMAGES` (the
    images calibration's evidence fit takes), i.e. the held-out images 500..4,999 of the null.
    ``columns``: a judged set's components (default: as judged)."""
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None
    kind = collect.table_kind(GATED_SCORE_NAME)
    found = collect.load_judged(collect.folder(name) / "sets" / kind / f"{part}__cifar10.npz")
    parts = torch.from_numpy(found["components"]) if columns is None else columns(found)
    scores = gate.score(alarm.reference.ranks(parts.float()))
    classes = torch.from_numpy(found["classes"]).long()
    start = CHOICE_IMAGES if part == "selection" else 0
    return scores[start:], classes[start:]


def alarm_rates(
    name: str,
    table: CalibrationTable,
    gate: Gate,
    rate: float = 0.01,
    columns: Callable[[dict[str, np.ndarray]], torch.Tensor] | None = None,
) -> dict:
    """The alarm rate at nominal ``rate`` of ``gate``'s score (over ``table``'s reference) on
    the report part's CIFAR-10 images, with per-class (Mondrian) nulls of the table's held-out
    images 500..4,999 (the null calibration makes; the pooled null for a class with fewer than
    ``DEFAULT_CLASS_NULL_MIN``): overall and per predicted class, each with its exact 95%
    interval (``bench.alarms.scores.alarm_rate``) and, per class, the size of the null its
    p-values came from. ``columns``: a judged set's components (default: as judged)."""
    null, null_classes = cifar_scores(name, table, gate, "selection", columns)
    scores, classes = cifar_scores(name, table, gate, "report", columns)
    k = table.num_classes
    per_class = ClassConditionalNull.of(null, null_classes, k, DEFAULT_CLASS_NULL_MIN)
    p = mondrian_p_values(per_class, scores, classes)
    c = classes.numpy()
    sizes = per_class.sizes.tolist()
    per = [{**alarm_rate(p[c == j], rate), "class": j,
            "null_size": sizes[j] if sizes[j] >= per_class.min_size else len(null)}
           for j in range(k) if (c == j).any()]  # fmt: skip
    return {"overall": alarm_rate(p, rate), "per_class": per}


def mondrian_p_values(
    per_class: ClassConditionalNull,
    scores: torch.Tensor,
    classes: torch.Tensor,
    interpolated: bool = True,
) -> np.ndarray:
    """The p-values of ``scores`` among the held-out scores of their ``classes`` (the pooled
    null's for a class with too few), as the monitor takes them: interpolated by default
    (``Thresholds(p_values=...)``), conservative with ``interpolated=False``."""
    pooled = ConformalNull.of(per_class.scores).p_values(scores, interpolated)
    return per_class.p_values(scores, classes, pooled, interpolated).numpy()


def weight_rotations(results: Mapping[str, dict], weights: Sequence[float] = WEIGHTS) -> list:
    """:func:`bench.alarms.loo.leave_one_model_out` over the fixed variants and the learned
    ones (family held out) at each rank weight: chosen on the other models' selection parts,
    reported on the held-out model's report part."""
    aurocs = {
        m: {part: {s: {k: v["auroc"] for k, v in info["scores"].items()}
                   for s, info in r["parts"][part].items()} for part in PARTS}
        for m, r in results.items()
    }  # fmt: skip
    family_of = {s: info["family"] for r in results.values() for s, info in r["sets"].items()}
    candidates = [*FIXED, *(weight_label(v, w) for v in LEARNED for w in weights)]
    return loo.leave_one_model_out(aurocs, family_of, candidates)


def _slack(rows: Sequence[dict]) -> dict:
    """The row whose margin plus tolerance (:func:`bench.alarms.loo.set_report`'s) is
    smallest: the set closest to failing the margin check (nominal sets excepted)."""
    return min((r for r in rows if r["tolerance"] is not None),
               key=lambda r: r["margin"] + r["tolerance"])  # fmt: skip


def checked(rows: Sequence[dict]) -> dict:
    """:func:`bench.alarms.loo.summary` of one score's set rows (:func:`bench.alarms.loo.
    set_report`'s), with the set closest to failing the margin check (``worst_margin``: its
    margin plus tolerance; ``worst_set``), the MNIST family's minimum AUROC and the nominal
    sets' largest deviation from 0.5."""
    s = loo.summary(rows)
    worst = _slack(rows)
    s["worst_margin"] = worst["margin"] + worst["tolerance"] + 0.0  # no -0.0
    s["worst_set"] = worst["set"]
    s["mnist_min"] = min((r["auroc"] for r in rows if r["mnist_ok"] is not None), default=None)
    s["nominal_max"] = max(
        (r["nominal_deviation"] for r in rows if r["nominal_deviation"] is not None),
        default=None,
    )
    return s


def summary(result: dict) -> dict[str, dict]:
    """Per library score, :func:`checked` of its report sets."""
    out = {}
    for score in SCORES:
        rows = []
        for set_name, info in result["sets"].items():
            aurocs = {k: v["auroc"] for k, v in info["scores"].items()}
            row = loo.set_report(aurocs, score, set_name, info["family"])
            rows.append({**row, "model": result["model"]})
        s = checked(rows)
        out[score] = s
    return out


def markdown(results: Mapping[str, dict]) -> str:
    """The summary table: per model and score, the beats, the worst set's margin plus its
    tolerance (and the set), the MNIST family's minimum and the nominal sets' largest
    deviation; then each variant's worst margin on the synthetic shifts of the choice images
    (the learned ones cross-fitted) and what ``auto`` picks."""
    lines = [
        "| model | score | beats every baseline | worst set's margin + tolerance (>= 0 passes) "
        "| MNIST family min | nominal max dev. | passed |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for name, result in results.items():
        for score, s in summary(result).items():
            label = f"{score} ({result['table_evidence']})" if score == TABLE else score
            lines.append(
                f"| {name} | {label} | {s['beats']} / {s['beats_of']} | {s['worst_margin']:+.3f} "
                f"({s['worst_set']}) | {s['mnist_min']:.3f} | {s['nominal_max']:.3f} | "
                f"{'yes' if s['passed'] else 'no'} |"
            )
    variants = list(next(iter(results.values()))["worst_margin"])
    lines += ["", "| model | " + " | ".join(variants) + " | auto chooses |",
              "|---|" + "---:|" * len(variants) + "---|"]  # fmt: skip
    for name, result in results.items():
        cells = " | ".join(f"{result['worst_margin'][v]:+.3f}" for v in variants)
        lines.append(f"| {name} | {cells} | {result['auto_choice']} |")
    lines += ["", "| held out | chosen on the other models' selection part | beats | slack | "
              "MNIST ok | passed |", "|---|---|---:|---:|---|---|"]  # fmt: skip
    rotations = weight_rotations(results) if len(results) > 1 else []
    for rot in rotations:
        s = rot["summary"]
        worst = _slack(rot["rows"])
        slack = worst["margin"] + worst["tolerance"]
        lines.append(
            f"| {rot['held_out']} | {rot['chosen']} | {s['beats']} / {s['beats_of']} | "
            f"{slack:+.3f} | {'yes' if s['mnist_ok'] else 'no'} | "
            f"{'yes' if s['passed'] else 'no'} |"
        )
    lines += ["", "| model | auto's variant | alarms at nominal 1% (95% interval) | "
              "classes outside their interval |", "|---|---|---|---:|"]  # fmt: skip
    for name, result in results.items():
        if "alarm_rates" not in result:
            continue
        r = result["alarm_rates"]
        o = r["overall"]
        outside = sum(not c["ci_low"] <= 0.01 <= c["ci_high"] for c in r["per_class"])
        lines.append(
            f"| {name} | {r['variant']} | {100 * o['rate']:.2f}% ({100 * o['ci_low']:.2f}-"
            f"{100 * o['ci_high']:.2f}%) | {outside} of {len(r['per_class'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.alarms.learned", description=__doc__)
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    results = {name: run_model(name, args.n) for name in args.models.split(",")}
    out = HERE / "results" / "learned.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
