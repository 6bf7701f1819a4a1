"""``python -m bench.alarms.knn_evidence``: the library's nearest-neighbour component and its
``+knn`` evidence variants on the benchmark's four models (issue 20); the default variant by
leave-one-model-out (:func:`variant_rotations`, since stop 39: the library's default on a
table with a KNN bank is its pick, ``learned+knn``); and what each rule for
``evidence="auto"`` would pick, with a leave-one-model-out of the rule.

**The table.** Each model's benchmark table (the gated score, cached by
``bench.alarms.families``) gains the KNN component as calibration adds it (:func:`with_knn`):
:class:`~surprise_monitor.monitor.knn_distance.KnnDistance` over the head layer's channel means
of the even half of the reference images (the positions
:func:`~surprise_monitor.calibrate.alarm.evenly_spaced` gives calibration among the 50,000
training images), its reference column the odd half's distances. The four models' classifiers
read the head layer's channel means (a global average pool, then the dense layer), so those
are the cached penultimate features; the module checks it on each model (the head distance of
the cached features against the judged sets' ``head_distance`` column).

**The figures.** From the judged sets of ``bench.alarms.families`` (components and features,
cached: run it first), with the KNN column added as the judge adds it: both parts' AUROCs of
every evidence variant the table now serves (:data:`VARIANTS`: the fixed four, and the learned
four with the KNN rank among their inputs, two of them with its column too, each family held
out as ``bench.alarms.learned`` holds it out), against the part's CIFAR-10 images (the
selection part's without the first 500, which calibration's choice takes), with
:mod:`bench.alarms.loo`'s checks, beside pytorch-ood's baselines on the same images
(:class:`bench.alarms.scores.Baselines`). And what ``auto`` sees: every variant's margin on
each synthetic shift of the choice images (test images 0..499, their features by a hook in the
judgements' batches; the learned ones cross-fitted, as the library's choice does), each rule's
pick (:data:`RULES`), and the leave-one-model-out of the rule (:func:`rule_rotations`: chosen
on the other three models' selection part, by the checks passed and then the sets of beats;
reported on the held-out model's report part). For the library's pick, the share of paired
bootstrap draws of each part that pass every check (:mod:`bench.alarms.resampled`), and its
alarm rates against the range exchangeable inputs give with these per-class nulls
(:func:`bench.alarms.class_rates.overall_range`).

Written: ``results/knn_evidence.json``; printed: the Markdown summary for ``bench/README.md``.
Options: ``--models`` (the four), ``--n 500`` (the families' set size: the judged sets of
``bench.alarms.families --n N``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.alarms import collect, learned, loo
from bench.alarms.class_rates import exchangeable_range, overall_range
from bench.alarms.report import log
from bench.alarms.resampled import CHECKS, pass_shares, resampled_checks
from bench.alarms.scores import Baselines, alarm_rate
from bench.alarms.sets import cache_stem
from bench.cifar import load_cifar10, to_tensor
from bench.strong_models import ALARM_MODELS, HELDOUT
from surprise_monitor.calibrate.alarm import evenly_spaced, knn_bank
from surprise_monitor.calibrate.evidence_choice import (
    CHOICE_IMAGES,
    PREFERRED,
    RULES,
    SHIFTS,
    choice_margins,
    fixed_variants,
    pick,
    resolved,
)
from surprise_monitor.calibrate.evidence_fit import fit_learned_evidence
from surprise_monitor.calibrate.options import DEFAULT_REFERENCE_IMAGES, AlarmOptions
from surprise_monitor.monitor.atypicality import (
    GATED_SCORE_NAME,
    KNN_VARIANTS,
    Gate,
    HeadDistance,
    ScoreReference,
)
from surprise_monitor.monitor.conformal import (
    DEFAULT_CLASS_NULL_MIN,
    ClassConditionalNull,
)
from surprise_monitor.monitor.learned_evidence import LEARNED_VARIANTS, LearnedEvidence
from surprise_monitor.monitor.table import CalibrationTable

HERE = Path(__file__).resolve().parent
#: The baselines beside the library's variants.
BASELINES = ("MSP", "MaxLogit", "Energy", "Mahalanobis", "KNN")
#: Every evidence variant of a table with the KNN bank, as the parts' scores are labelled.
VARIANTS = (
    "energy", "energy+mass", *KNN_VARIANTS, *(v + learned.HELD_OUT for v in LEARNED_VARIANTS)
)  # fmt: skip
Judged = tuple[torch.Tensor, torch.Tensor]


def with_knn(table: CalibrationTable, features: np.ndarray) -> CalibrationTable:
    """``table`` with the KNN component as calibration adds it, from the training images'
    head features ``features [50000, C]`` (the reference images' even half: the bank; the odd
    half: the reference column), its evidence variant ``energy`` until one is chosen (a
    learned fit of the table's has a column too few)."""
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None
    positions = evenly_spaced(len(features), DEFAULT_REFERENCE_IMAGES)
    even, odd = positions[0::2], positions[1::2]
    f = torch.from_numpy(features)
    knn = knn_bank(AlarmOptions(score=GATED_SCORE_NAME), f[torch.from_numpy(even)])
    assert knn is not None
    column = torch.sort(knn(f[torch.from_numpy(odd)])).values.contiguous()
    reference = ScoreReference((*alarm.reference.sorted_components, column), alarm.reference.tail)
    alarm = replace(alarm, knn=knn, reference=reference, evidence="energy", learned=None)
    out = replace(table, alarm=alarm, path=None, sha256="")
    assert out.alarm is not None
    out.alarm.validate(out.levels)
    return out


def check_features(table: CalibrationTable, found: Mapping[str, np.ndarray]) -> float:
    """The largest relative gap between the judged ``head_distance`` column and the head
    distance of the cached features (0 when the features are the head's channel means)."""
    alarm = table.alarm
    assert alarm is not None and alarm.head_means is not None and alarm.head_precision is not None
    column = alarm.component_names().index(f"head_distance:{alarm.head_layer}")
    head = HeadDistance.of(alarm.head_means, alarm.head_precision)
    mine = head(torch.from_numpy(found["features"]).float()).double()
    judged = torch.from_numpy(found["components"][:, column]).double()
    return float(((mine - judged).abs() / judged.abs().clamp_min(1.0)).max())


def knn_ranks(table: CalibrationTable, features: torch.Tensor) -> torch.Tensor:
    """``[B]`` tail ranks of the KNN distances of ``features [B, C]`` (the table's last
    column)."""
    alarm = table.alarm
    assert alarm is not None and alarm.knn is not None and alarm.reference is not None
    column = ScoreReference(alarm.reference.sorted_components[-1:], alarm.reference.tail)
    return column.ranks(alarm.knn(features.float())[:, None])[:, 0]


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


def knn_setup(name: str) -> tuple[torch.nn.Module, CalibrationTable, Judged, dict[str, Judged]]:
    """A model, its benchmark table with the KNN component (:func:`with_knn`), and the choice
    images' judgements, clean and per synthetic shift, with the KNN rank's column."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log, GATED_SCORE_NAME)
    clean, shifted = learned.choice_judgements(name, model, table)
    table = with_knn(table, collect.train_features(name, model)[0])
    test = load_cifar10("test")
    x = to_tensor(test.images[HELDOUT.start : HELDOUT.start + CHOICE_IMAGES])
    feats = choice_features(model, x)

    def extended(key: str, judged: Judged) -> Judged:
        """The judged choice images' ranks with the KNN rank's column."""
        return torch.cat([judged[0], knn_ranks(table, feats[key])[:, None]], dim=1), judged[1]

    return model, table, extended("clean", clean), {s: extended(s, j) for s, j in shifted.items()}


def default_gate(
    name: str, evidence: str = PREFERRED
) -> tuple[CalibrationTable, Gate, LearnedEvidence | None]:
    """A model's benchmark table with the KNN component (:func:`knn_setup`), the gate of the
    evidence variant ``evidence`` stands for on it (the default: ``learned+knn``), fitted as
    calibration fits it (on the choice images and every one of their synthetic shifts), and
    that fit (``None`` for a fixed variant)."""
    _, table, clean, shifted = knn_setup(name)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None and alarm.gate_threshold is not None
    variant = resolved(evidence, knn=True)
    fit = None
    if variant in LEARNED_VARIANTS:
        fit = fit_learned_evidence(
            clean[0], {s: r for s, (r, _) in shifted.items()}, alarm.reference.rank_floor
        )
    return table, Gate.columns(alarm.component_names(), variant, alarm.gate_threshold, fit), fit


def knn_columns(table: CalibrationTable, found: Mapping[str, np.ndarray]) -> torch.Tensor:
    """A judged set's components with the KNN distance's column, as the judge adds it (the
    distance of its cached head features to ``table``'s bank)."""
    assert table.alarm is not None and table.alarm.knn is not None
    knn = table.alarm.knn(torch.from_numpy(found["features"]).float())[:, None]
    return torch.cat([torch.from_numpy(found["components"]).float(), knn], dim=1)


def run_model(name: str, n: int = 500) -> dict:
    """Both parts' AUROCs of every variant, the choice images' margins, each rule's pick and
    the feature check (see the module docstring)."""
    model, table, clean, shifted = knn_setup(name)
    alarm = table.alarm
    assert alarm is not None and alarm.reference is not None and alarm.gate_threshold is not None
    names, threshold = alarm.component_names(), alarm.gate_threshold
    floor = alarm.reference.rank_floor
    margins = choice_margins(names, threshold, clean, shifted, floor)
    gates = learned._gates(names, threshold, learned.fits(clean, shifted, floor), ())
    fixed = {v: Gate.columns(names, v, threshold) for v in fixed_variants(names)}
    gap = 0.0

    def columns(found: dict[str, np.ndarray]) -> torch.Tensor:
        """A judged set's components with the KNN distance's column."""
        return knn_columns(table, found)

    baselines = memoised(Baselines(*collect.train_features(name, model)))

    def scores(found: dict[str, np.ndarray], family: str | None) -> dict[str, np.ndarray]:
        """Every variant's score of a judged set (the held-out fits for ``family``) and every
        baseline's."""
        nonlocal gap
        gap = max(gap, check_features(table, found))
        ranks = alarm.reference.ranks(columns(found))
        out = {v: g.score(ranks) for v, g in fixed.items()}
        for (label, fit), gate in gates.items():
            if fit == family and label.endswith(learned.HELD_OUT):
                out[label] = gate.score(ranks)
        return {**{k: v.double().numpy() for k, v in out.items()}, **baselines(found)}

    chosen = resolved(PREFERRED, knn=True)  # the library's default on a table with a KNN bank
    parts, aurocs, resampled = {}, {}, {}
    for part in learned.PARTS:
        per_image = learned.part_scores(name, n, part, scores)
        parts[part] = learned.detections(per_image)
        aurocs[part] = {s: {k: v["auroc"] for k, v in info["scores"].items()}
                        for s, info in parts[part].items()}  # fmt: skip
        resampled[part] = pass_shares(resampled_checks(per_image, label_of(chosen), name))
    log(f"{name}: features = head channel means to {gap:.1e} (relative, head distance)")
    gate = gates[(chosen, None)] if chosen in LEARNED_VARIANTS else fixed[chosen]
    rates = learned.alarm_rates(name, table, gate, columns=columns)

    def gate_of(family: str | None) -> Gate:
        """The pick's gate as the parts score it (a learned fit without ``family``)."""
        return gates[(label_of(chosen), family)] if chosen in LEARNED_VARIANTS else gate

    per_set = {s: {**info["scores"][label_of(chosen)], "alarms": r, "family": info["family"],
                   "baselines": {b: info["scores"][b] for b in BASELINES}}
               for (s, info), r in zip(parts["report"].items(),
                                       set_rates(name, n, table, gate_of, columns).values(),
                                       strict=True)}  # fmt: skip
    return {"model": name, "n": n, "bank": int(alarm.knn.bank.shape[0]), "k": alarm.knn.k,
            "feature_gap": gap, "aurocs": aurocs,
            "families": {s: i["family"] for s, i in parts["report"].items()},
            "margins": margins, "picks": {rule: pick(margins, rule) for rule in RULES},
            "alarm_rates": {"variant": chosen, "rule": PREFERRED, **rates},
            "pick_sets": per_set, "resampled": resampled}  # fmt: skip


def memoised(baselines: Baselines) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """``baselines.scores`` remembered per judged set's features (a part's CIFAR-10 images are
    every set's reference: their KNN scores are taken once, not once per set)."""
    seen: dict[str, dict[str, np.ndarray]] = {}

    def scores(found: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The baselines' scores of ``found``."""
        digest = hashlib.sha256()
        for field in ("features", "logits"):
            digest.update(np.ascontiguousarray(found[field]).tobytes())
        key = digest.hexdigest()
        if key not in seen:
            seen[key] = baselines.scores(dict(found))
        return seen[key]

    return scores


def set_rates(
    name: str,
    n: int,
    table: CalibrationTable,
    gate_of: Callable[[str | None], Gate],
    columns: Callable[[dict[str, np.ndarray]], torch.Tensor],
    rate: float = 0.01,
) -> dict[str, dict]:
    """Per report set, the share of its images that alarm at nominal ``rate``: p-values among
    the null of held-out images 500..4,999 (per predicted class, pooled where a class has fewer
    than ``DEFAULT_CLASS_NULL_MIN``), each set scored by ``gate_of(its synthetic family)``."""
    assert table.alarm is not None and table.alarm.reference is not None
    reference = table.alarm.reference
    null_ranks, null_classes = null_judgements(name, table, columns)
    nulls: dict[str | None, ClassConditionalNull] = {}  # per synthetic family: its gate's null
    out = {}
    for set_name, set_family, found in report_sets(name, n):
        family = learned.FAMILY_OF.get(set_family)
        gate = gate_of(family)
        if family not in nulls:
            nulls[family] = ClassConditionalNull.of(
                gate.score(null_ranks), null_classes, table.num_classes, DEFAULT_CLASS_NULL_MIN
            )
        scores = gate.score(reference.ranks(columns(found)))
        classes = torch.from_numpy(found["classes"]).long()
        out[set_name] = alarm_rate(learned.mondrian_p_values(nulls[family], scores, classes), rate)
    return out


def null_judgements(
    name: str, table: CalibrationTable, columns: Callable[[dict[str, np.ndarray]], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conformal null's images (held-out 500..4,999: the selection part's CIFAR-10 images
    past the choice's): their ranks over ``table``'s reference and their predicted classes."""
    assert table.alarm is not None and table.alarm.reference is not None
    kind = collect.table_kind(GATED_SCORE_NAME)
    null_set = collect.load_judged(collect.folder(name) / "sets" / kind / "selection__cifar10.npz")
    ranks = table.alarm.reference.ranks(columns(null_set))[CHOICE_IMAGES:]
    return ranks, torch.from_numpy(null_set["classes"]).long()[CHOICE_IMAGES:]


def report_sets(name: str, n: int) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """The report part's judged sets of ``bench.alarms.families --n n``: name, family and the
    cached judgement of each."""
    kind = collect.table_kind(GATED_SCORE_NAME)
    meta = json.loads((learned.FAMILIES_RESULTS / f"{name}.json").read_text())
    for set_name, info in meta["parts"]["report"]["sets"].items():
        file = f"{cache_stem('report', set_name)}.npz"
        found = collect.load_judged(collect.folder(name) / "families" / kind / f"n{n}" / file)
        yield set_name, info["family"], found


def label_of(variant: str) -> str:
    """The parts' score label of an evidence variant (the learned ones: family held out)."""
    return variant + learned.HELD_OUT if variant in LEARNED_VARIANTS else variant


def checks(aurocs: Mapping[str, Mapping[str, float]], family_of: Mapping[str, str], score: str,
           model: str) -> dict:  # fmt: skip
    """:func:`bench.alarms.learned.checked` of ``score`` over one part's sets (``worst_margin``:
    the worst set's margin plus tolerance; ``mnist_min``: the MNIST family's minimum)."""
    return learned.checked([{"model": model, **loo.set_report(a, score, s, family_of[s])}
                            for s, a in aurocs.items()])  # fmt: skip


def rule_ranking(
    results: Mapping[str, dict], models: Sequence[str], verdict: Callable[[str, str, str], dict]
) -> list[tuple[str, tuple[int, int]]]:
    """The rules of :data:`RULES`, best first, each with its picks' count of checks passed on
    ``models``' selection part and then of sets where they beat the baselines (ties: the
    first listed). ``verdict(model, part, variant)``: that part's checks."""

    def key(rule: str) -> tuple[int, int]:
        """Checks passed, then sets of beats, on the models' selection part."""
        found = [verdict(m, "selection", results[m]["picks"][rule]) for m in models]
        return sum(bool(c["passed"]) for c in found), sum(c["beats"] for c in found)

    ranked = sorted(RULES, key=lambda r: (*key(r), -RULES.index(r)), reverse=True)
    return [(r, key(r)) for r in ranked]


def best_rule(
    results: Mapping[str, dict], models: Sequence[str], verdict: Callable[[str, str, str], dict]
) -> tuple[str, tuple[int, int]]:
    """The first of :func:`rule_ranking` and its two counts."""
    return rule_ranking(results, models, verdict)[0]


def rule_rotations(
    results: Mapping[str, dict], verdict: Callable[[str, str, str], dict]
) -> list[dict]:
    """Leave one model out of the rule: for each model, :func:`best_rule` on the other
    models, and that rule's pick on the held-out model with its report part's verdict; and
    the closest call (``runner_up``: the best-ranked rule that picks otherwise on the held-out
    model, its counts, pick and verdict; ``None`` when every rule picks the same)."""
    out = []
    for held in results:
        ranked = rule_ranking(results, [m for m in results if m != held], verdict)
        (rule, seen), picks = ranked[0], results[held]["picks"]
        chosen = picks[rule]
        other = next(((r, k) for r, k in ranked if picks[r] != chosen), None)
        runner_up = None if other is None else {
            "rule": other[0], "seen": other[1], "picks": picks[other[0]],
            "report": verdict(held, "report", picks[other[0]])}  # fmt: skip
        out.append({"held_out": held, "rule": rule, "seen": seen, "picks": chosen,
                    "report": verdict(held, "report", chosen), "runner_up": runner_up})  # fmt: skip
    return out


def variant_rotations(results: Mapping[str, dict], with_auto: bool = False) -> list[dict]:
    """:func:`bench.alarms.loo.leave_one_model_out` (the third round's rule: the MNIST gate,
    the nominal sets, the highest worst margin, the most sets beaten) over every evidence
    variant (the learned ones with the set's family out of the fit) and, ``with_auto``, over
    ``auto`` under each rule as well (``auto:<rule>``: on each model, the variant that rule
    picks there): chosen on the other models' selection part, reported on the held-out
    model's report part."""
    aurocs: dict = {}
    for m, r in results.items():
        auto = {f"auto:{rule}": label_of(v) for rule, v in r["picks"].items()} if with_auto else {}
        aurocs[m] = {part: {s: {**a, **{k: a[v] for k, v in auto.items()}}
                            for s, a in sets.items()}
                     for part, sets in r["aurocs"].items()}  # fmt: skip
    family_of = {s: f for r in results.values() for s, f in r["families"].items()}
    first = next(iter(results.values()))["aurocs"]["selection"]
    candidates = [v for v in VARIANTS if v in next(iter(first.values()))]
    if with_auto:
        candidates += [f"auto:{rule}" for rule in RULES]
    return loo.leave_one_model_out(aurocs, family_of, candidates)


def in_range(c: dict, rate: float = 0.01) -> bool:
    """Whether a class's alarm count (``learned.alarm_rates``' per-class entry) lies in the
    central 95% range for exchangeable normal inputs, the null's draw included
    (:func:`bench.alarms.class_rates.exchangeable_range`)."""
    low, high = exchangeable_range(c["null_size"], c["inputs"], rate, interpolated=True)
    return low <= c["alarms"] <= high


def _cell(c: dict) -> str:
    """``beats / slack / MNIST min / passed`` of one part."""
    return (f"{c['beats']} / {c['worst_margin']:+.3f} / {c['mnist_min']:.3f} / "
            f"{'yes' if c['passed'] else 'no'}")  # fmt: skip


def markdown(results: Mapping[str, dict]) -> str:
    """Per model and variant, each part's beats, slack, MNIST minimum and verdict; each
    variant's worst / mean / median margin and shifts won on the choice images; what each rule
    picks; the leave-one-model-out of the rule; the pick's alarm rates, its share of resamples
    passing and its every report set."""

    def verdict(model: str, part: str, variant: str) -> dict:
        """One part's checks of a variant on a model."""
        result = results[model]
        return checks(result["aurocs"][part], result["families"], label_of(variant), model)

    lines = ["| model | variant | selection: beats / slack / MNIST min / passed | "
             "report: beats / slack / MNIST min / passed |", "|---|---|---|---|"]  # fmt: skip
    for name in results:
        for v in (*fixed_variants(["knn_distance:h"]), *LEARNED_VARIANTS):
            cells = [_cell(verdict(name, part, v)) for part in learned.PARTS]
            lines.append(f"| {name} | {v} | {cells[0]} | {cells[1]} |")
    variants = list(next(iter(results.values()))["margins"])
    lines += ["", "| model | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, result in results.items():
        cells = []
        for v in variants:
            m = sorted(result["margins"][v].values())
            won = sum(x > 0 for x in m)
            cells.append(f"{m[0]:+.3f} / {sum(m) / len(m):+.3f} / {m[len(m) // 2]:+.3f} / {won}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | rule | picks | selection | report |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for rule, chosen in result["picks"].items():
            cells = [_cell(verdict(name, part, chosen)) for part in learned.PARTS]
            lines.append(f"| {name} | {rule} | {chosen} | {cells[0]} | {cells[1]} |")
    lines += ["", "| held out | rule chosen on the other three (passed, beats) | picks | report | "
              "closest rule picking otherwise (passed, beats): its pick, report |",
              "|---|---|---|---|---|"]  # fmt: skip
    for rot in rule_rotations(results, verdict) if len(results) > 1 else []:
        seen = f"{rot['rule']} ({rot['seen'][0]}, {rot['seen'][1]})"
        other = rot["runner_up"]
        alt = "-" if other is None else (f"{other['rule']} ({other['seen'][0]}, "
                                         f"{other['seen'][1]}): {other['picks']}, "
                                         f"{_cell(other['report'])}")  # fmt: skip
        lines.append(f"| {rot['held_out']} | {seen} | {rot['picks']} | {_cell(rot['report'])} "
                     f"| {alt} |")  # fmt: skip
    lines += variant_rotation_lines(results) if len(results) > 1 else []
    lines += rate_lines(results)
    lines += ["", "| model | the library's pick | part | resamples passing every check | "
              "margins | MNIST family | nominal sets | beats on half |",
              "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, result in results.items():
        for part, shares in result["resampled"].items():
            cells = " | ".join(f"{shares[c]:.2f}" for c in ("passed", *CHECKS[:-1]))
            lines.append(f"| {name} | {result['alarm_rates']['variant']} | {part} | {cells} |")
    for name, result in results.items():
        lines += ["", *pick_table(name, result)]
    rule, seen = best_rule(results, list(results), verdict)
    lines += ["", f"On every model's selection part: `{rule}` ({seen[0]} passed, {seen[1]} sets "
              "of beats)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def variant_rotation_lines(results: Mapping[str, dict]) -> list[str]:
    """The table of :func:`variant_rotations`, over the variants and then with ``auto`` too:
    per held-out model, the candidate chosen on the others (its worst margin and sets won
    there) and its report part's verdict."""
    lines = ["", "| candidates | held out | chosen on the other three (worst margin, sets won) "
             "| report: beats / slack / MNIST min / passed |", "|---|---|---|---|"]  # fmt: skip
    for with_auto in (False, True):
        for rot in variant_rotations(results, with_auto):
            top, c = rot["ranking"][0], learned.checked(rot["rows"])
            lines.append(f"| {'variants and auto' if with_auto else 'variants'} | "
                         f"{rot['held_out']} | {rot['chosen']} ({top['worst_margin']:+.3f}, "
                         f"{top['sets_won']}) | {_cell(c)} |")  # fmt: skip
    return lines


def rate_lines(results: Mapping[str, dict]) -> list[str]:
    """The table of the pick's alarm rates at nominal 1%: overall with its exact interval and
    the expected rate and 95% range of exchangeable inputs with these per-class nulls
    (:func:`bench.alarms.class_rates.overall_range`), and per class how many leave 1% out of
    their interval or fall outside their exchangeable range."""
    lines = ["", "| model | the library's pick (rule) | alarms at nominal 1% (95% interval) | "
             "expected with these nulls (95% range of exchangeable inputs) | classes whose "
             "interval leaves out 1% | classes outside the exchangeable range |",
             "|---|---|---|---|---:|---:|"]  # fmt: skip
    for name, result in results.items():
        r = result["alarm_rates"]
        o, per = r["overall"], r["per_class"]
        outside = sum(not c["ci_low"] <= 0.01 <= c["ci_high"] for c in per)
        off = sum(not in_range(c) for c in per)
        band = overall_range([(c["null_size"], c["inputs"]) for c in per], 0.01,
                             interpolated=True)  # fmt: skip
        n = sum(c["inputs"] for c in per)
        lines.append(f"| {name} | {r['variant']} ({r['rule']}) | {100 * o['rate']:.2f}% "
                     f"({100 * o['ci_low']:.2f}-{100 * o['ci_high']:.2f}%) | "
                     f"{100 * band['expected'] / n:.2f}% ({100 * band['low'] / n:.2f}-"
                     f"{100 * band['high'] / n:.2f}%) | {outside} of {len(per)} | {off} of "
                     f"{len(per)} |")  # fmt: skip
    return lines


def pick_table(name: str, result: dict) -> list[str]:
    """Every report set of a model: the library's pick's AUROC, FPR95 and alarms at nominal 1%
    against each baseline's AUROC / FPR95, its margin over the best logit baseline, and whether
    it beats KNN and the logit baselines."""
    chosen = result["alarm_rates"]["variant"]
    lines = [f"**{name}**, the default's variant `{chosen}` on the report part (AUROC / FPR95; "
             "alarms at nominal 1%)", "",
             "| set | family | pick | alarms | " + " | ".join(BASELINES) + " | margin | beats |",
             "|---|---|---|---:|" + "---|" * len(BASELINES) + "---:|---|"]  # fmt: skip
    for s, mine in result["pick_sets"].items():
        base = mine["baselines"]
        row = loo.set_report({**{b: base[b]["auroc"] for b in BASELINES}, "x": mine["auroc"]},
                             "x", s, mine["family"])  # fmt: skip
        cells = " | ".join(f"{base[b]['auroc']:.3f} / {base[b]['fpr95']:.2f}" for b in BASELINES)
        beats = "-" if row["beats"] is None else ("yes" if row["beats"] else "no")
        lines.append(f"| {s} | {mine['family']} | {mine['auroc']:.3f} / {mine['fpr95']:.2f} | "
                     f"{100 * mine['alarms']['rate']:.1f}% | {cells} | {row['margin']:+.3f} | "
                     f"{beats} |")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.alarms.knn_evidence", description=__doc__
    )
    parser.add_argument("--models", default=",".join(ALARM_MODELS))
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args(argv)
    results = {name: run_model(name, args.n) for name in args.models.split(",")}
    out = HERE / "results" / "knn_evidence.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
