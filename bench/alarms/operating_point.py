"""``python -m bench.alarms.operating_point``: what an operator gets at the alarm rate they run
(nominal 1%), per shift family, with the gate at several levels and with Energy alone.

AUROC ranks a set over every threshold; an operator runs one. The gated score ranks first every
input whose stage distances lie beyond a share ``gate_level`` of the reference images
(``AlarmOptions.gate_level``), so at an alarm rate near that share the gate takes nearly all the
alarms and near shifts, which do not move the stage distances, get few. For each model, the
report part of the shift-family benchmark (``n`` images per set, judged and cached by
:mod:`bench.alarms.families` with the library's gated table) is scored by:

- ``library``: the table's own score (its evidence variant, the gate at the level it was
  calibrated with, on the training reference);
- ``gate L``: the same components and evidence with the gate's threshold at the ``1 - L``
  quantile of the null part's own gate statistics (the training reference's rows are not
  cached, so the held-out images stand in for them; ``gate 0.01`` beside ``library`` shows how
  closely);
- ``Energy alone``: pytorch-ood's energy of the logits, the one-line baseline;
- ``library, gate L``: the score of a table calibrated with its gate at ``L`` (``python -m
  bench.alarms.families --score gated-stage-energy-v1 --gate-level L``) judging the same
  images, where those sets are cached: what the ``gate L`` rows stand in for.

Every score's p-values come from per-class (Mondrian) nulls of the null part's scores (test
images 0..4,999, a class's own null from 200 images, else the pooled null:
:class:`~surprise_monitor.monitor.conformal.ClassConditionalNull`, the library's). Written:
``results/operating_point.json`` (``models``: per model, per score, each family's mean alarm
rate at 1% over its sets, its mean and lowest AUROC, and the report part's normal images' rate;
``level_leave_one_model_out``: the gate level :mod:`bench.alarms.loo`'s rule picks for each
held-out model from the other models' selection parts, among the levels whose family results
(``--families``: ``gated/`` for the default level, ``gated_gateL/`` for the others) every
model has, with the issue's checks on the held-out report part) and the table
``bench/README.md`` quotes. Options: ``--models``, ``--n 200``, ``--levels 0.005,0.01,0.015``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.alarms import collect, loo
from bench.alarms.report import log
from bench.alarms.sets import PARTS, base_rows, cache_stem, families
from bench.paper.metrics import auroc
from bench.strong_models import ALARM_MODELS
from surprise_monitor.monitor.atypicality import (
    GATE_LEVEL,
    GATED_SCORE_NAME,
    Gate,
    ScoreReference,
    energy,
)
from surprise_monitor.monitor.conformal import ClassConditionalNull, ConformalNull
from surprise_monitor.monitor.table import CalibrationTable

HERE = Path(__file__).resolve().parent
RATE = 0.01
LEVELS = (0.005, 0.01, 0.015)
LIBRARY, ENERGY = "library", "Energy alone"
NULL_PART, REPORT_PART = PARTS


def gate_label(level: float) -> str:
    """The name of the gate-at-``level`` score."""
    return f"gate {level:g}"


def rescored(
    found: dict[str, np.ndarray],
    gate: Gate,
    reference: ScoreReference,
    thresholds: dict[float, float],
) -> dict[str, np.ndarray]:
    """The library's, each ``gate L``'s (``thresholds[L]``) and Energy's score of one judged
    set (``found``: :func:`bench.alarms.collect._judge`'s arrays; ``reference``: the table's
    :class:`~surprise_monitor.monitor.atypicality.ScoreReference`)."""
    ranks = reference.ranks(torch.from_numpy(found["components"]).float())
    out = {LIBRARY: np.asarray(found["score"], np.float64)}
    for level, threshold in thresholds.items():
        at = Gate(gate.gate, gate.evidence, threshold)
        out[gate_label(level)] = at.score(ranks).double().numpy()
    out[ENERGY] = energy(torch.from_numpy(found["logits"])).double().numpy()
    return out


def gate_thresholds(
    null_found: dict[str, np.ndarray],
    gate: Gate,
    reference: ScoreReference,
    levels: Sequence[float],
) -> dict[float, float]:
    """Each level's threshold: the ``1 - level`` quantile of the null images' gate statistics."""
    ranks = reference.ranks(torch.from_numpy(null_found["components"]).float())
    stat = gate.statistic(ranks).double()
    return {lv: float(torch.quantile(stat, 1.0 - lv)) for lv in levels}


def alarm_share(
    null_scores: np.ndarray,
    null_classes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    rate: float = RATE,
) -> float:
    """The share of ``scores`` (judged against ``classes``) whose per-class conformal p-value
    among ``null_scores`` (of ``null_classes``) is at most ``rate``."""
    null = ClassConditionalNull.of(
        torch.from_numpy(null_scores), torch.from_numpy(null_classes), num_classes
    )
    s = torch.from_numpy(np.asarray(scores, np.float32))
    pooled = ConformalNull.of(torch.from_numpy(null_scores)).p_values(s)
    p = null.p_values(s, torch.from_numpy(classes), pooled)
    return float((p <= rate).double().mean())


Scorer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def tally(name: str, kind: str, n: int, scorer: Scorer, k: int) -> dict:
    """The report part's normal images' alarm rate and each family's alarm rates and AUROCs
    (every set's, in :func:`bench.alarms.sets.families`' order) of every score ``scorer``
    gives, from the sets judged by the table ``kind``; p-values among the same scores of that
    kind's null part."""
    root = collect.folder(name)
    null = collect.load_judged(root / "sets" / kind / f"{NULL_PART}__cifar10.npz")
    null_scores = scorer(null)
    clean = collect.load_judged(root / "sets" / kind / f"{REPORT_PART}__cifar10.npz")
    clean_scores = scorer(clean)

    def share(scores: dict[str, np.ndarray], classes: np.ndarray) -> dict[str, float]:
        return {s: alarm_share(null_scores[s], null["classes"], v, classes, k)
                for s, v in scores.items()}  # fmt: skip

    out: dict = {"normal_rate": share(clean_scores, clean["classes"]), "families": {}}
    for family, names in families().items():
        fam = out["families"].setdefault(family, {})
        for set_name in names:
            found = collect.load_judged(root / "families" / kind / f"n{n}" /
                                        f"{cache_stem(REPORT_PART, set_name)}.npz")  # fmt: skip
            scores = scorer(found)
            for s, r in share(scores, found["classes"]).items():
                fam.setdefault(f"rate:{s}", []).append(r)
            rows = base_rows(REPORT_PART, len(found["classes"]))
            inlier = clean_scores if family != loo.NOMINAL else {  # the same images, unshifted
                s: v[rows] for s, v in clean_scores.items()}  # fmt: skip
            for s, v in scores.items():
                fam.setdefault(f"auroc:{s}", []).append(auroc(inlier[s], v))
    return out


def _summary(sets: dict[str, list[float]]) -> dict[str, float]:
    """Means of a family's per-set figures, and the lowest AUROC of each score."""
    lowest = {f"auroc_min:{key[6:]}": float(np.min(v)) for key, v in sets.items()
              if key.startswith("auroc:")}  # fmt: skip
    return {**{key: float(np.mean(v)) for key, v in sets.items()}, **lowest}


def calibrated_label(level: float) -> str:
    """The name of the rows of a table calibrated with its gate at ``level``."""
    return f"library, gate {level:g}"


def run_model(name: str, n: int = 200, levels: Sequence[float] = LEVELS) -> dict:
    """Every family's alarm rate at :data:`RATE` and AUROC for one model (module docstring),
    with the rows of tables calibrated at the other ``levels`` where their sets are cached."""
    model = collect.load_model(name)
    table = collect.table_of(name, model, log, GATED_SCORE_NAME)
    alarm = table.alarm
    gate, reference, k = alarm.gate(), alarm.reference, table.num_classes
    kind = collect.table_kind(GATED_SCORE_NAME)
    null = collect.load_judged(collect.folder(name) / "sets" / kind / f"{NULL_PART}__cifar10.npz")
    thresholds = gate_thresholds(null, gate, reference, levels)
    out = tally(name, kind, n, lambda f: rescored(f, gate, reference, thresholds), k)
    calibrated = {}
    for level in levels:
        other = collect.table_kind(GATED_SCORE_NAME, level)
        if other == kind or not (collect.folder(name) / "families" / other / f"n{n}").is_dir():
            continue
        label = calibrated_label(level)
        rows = tally(
            name, other, n, lambda f, lb=label: {lb: np.asarray(f["score"], np.float64)}, k
        )
        out["normal_rate"].update(rows["normal_rate"])
        for family, sets in rows["families"].items():
            out["families"][family].update(sets)
        path = collect.table_file(name, GATED_SCORE_NAME, level)
        calibrated[f"{level:g}"] = CalibrationTable.load(path).alarm.gate_threshold
    return {
        "model": name, "evidence": alarm.evidence, "n": n,
        "library_gate_level": alarm.gate_level, "thresholds": thresholds,
        "library_threshold": alarm.gate_threshold, "calibrated_thresholds": calibrated,
        "normal_rate": out["normal_rate"],
        "families": {f: _summary(d) for f, d in out["families"].items()},
    }  # fmt: skip


def level_aurocs(by_level: dict[float, loo.Aurocs], evidence: dict[tuple[str, float], str]) -> dict:
    """``aurocs[model][part][set][score]`` (:mod:`bench.alarms.loo`'s) with one candidate per
    gate level, ``gate L``: the AUROC of the table calibrated at ``L`` in its own evidence
    variant (``evidence[(model, L)]``), beside the baselines (the same at every level)."""
    levels = sorted(by_level)
    models = set.intersection(*(set(by_level[lv]) for lv in levels))
    out: dict = {}
    for m in sorted(models):
        out[m] = {}
        for part in loo.PARTS:
            sets = by_level[levels[0]][m][part]
            out[m][part] = {
                name: {**{b: scores[b] for b in loo.BASELINES if b in scores},
                       **{gate_label(lv): by_level[lv][m][part][name][
                           f"library {evidence[(m, lv)]}"] for lv in levels}}
                for name, scores in sets.items()
            }  # fmt: skip
    return out


def level_leave_one_model_out(aurocs: dict) -> list[dict]:
    """:func:`bench.alarms.loo.leave_one_model_out` among the gate levels of
    :func:`level_aurocs`: each held-out model's level chosen by the benchmark's rule on the
    other models' selection parts, reported with the issue's checks on its report part."""
    family_of = loo.family_map({s for m in aurocs.values() for p in m.values() for s in p})
    labels = [c for c in next(iter(next(iter(aurocs.values()))["report"].values()))
              if c.startswith("gate ")]  # fmt: skip
    return loo.leave_one_model_out(aurocs, family_of, labels)


def markdown(results: dict[str, dict]) -> str:
    """Per model, a row per score: the normal images' rate and each family's alarm rate at
    :data:`RATE` (AUROC below it)."""
    lines = []
    for name, r in results.items():
        fams = list(r["families"])
        scores = list(r["normal_rate"])
        lines += [f"**{name}** (evidence {r['evidence']}): alarms at nominal 1%, % of each "
                  "family's images (mean over its sets); AUROC beneath", "",
                  "| score | normal | " + " | ".join(fams) + " |",
                  "|---|---:|" + "---:|" * len(fams)]  # fmt: skip
        for s in scores:
            rates = " | ".join(
                f"{100 * r['families'][f][f'rate:{s}']:.1f} ({r['families'][f][f'auroc:{s}']:.3f})"
                for f in fams
            )
            lines.append(f"| {s} | {100 * r['normal_rate'][s]:.2f} | {rates} |")
        lines.append("")
    return "\n".join(lines)


def _level_rotations(models: Sequence[str], levels: Sequence[float], folder: Path) -> list:
    """The leave-one-model-out rotations over the gate levels whose family results are in
    ``folder`` for every model (each table's evidence read from the cache); [] when fewer
    than two levels and two models have them."""
    by_level, evidence = {}, {}
    for lv in levels:
        sub = folder / ("gated" if lv == GATE_LEVEL else f"gated_gate{lv:g}")
        paths = [sub / f"{m}.json" for m in models]
        if not all(p.is_file() for p in paths):
            continue
        by_level[lv] = loo.read_results(paths)
        for m in models:
            path = collect.table_file(m, GATED_SCORE_NAME, lv)
            evidence[(m, lv)] = CalibrationTable.load(path).alarm.evidence
    if len(by_level) < 2 or len(models) < 2:
        return []
    rotations = level_leave_one_model_out(level_aurocs(by_level, evidence))
    for r in rotations:
        print(
            f"held out {r['held_out']}: {r['chosen']} chosen; on its report part "
            f"{json.dumps(r['summary'])}"
        )
    return [{k: r[k] for k in ("held_out", "chosen", "summary")} for r in rotations]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.alarms.operating_point")
    p.add_argument("--models", default=",".join(ALARM_MODELS))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--levels", default=",".join(f"{lv:g}" for lv in LEVELS))
    p.add_argument("--families", default=str(HERE / "results" / "families"),
                   help="where the families benchmark's gated results are: gated/ (the "
                   "default level) and gated_gateL/")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "operating_point.json"))
    args = p.parse_args(argv)
    levels = [float(v) for v in args.levels.split(",")]
    models = args.models.split(",")
    results = {m: run_model(m, args.n, levels) for m in models}
    print(markdown(results))
    rotations = _level_rotations(models, levels, Path(args.families))
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"models": results, "level_leave_one_model_out": rotations},
                              indent=1) + "\n")  # fmt: skip
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
