"""Leave-one-out choice of the default alarm score (issue 20, item 2), and its report.

Protocol. The AUROCs come as ``aurocs[model][part][set][score]``: every candidate score
(:data:`bench.alarms.combine.CANDIDATES`, or whatever candidates a results file carries) and
every baseline (:data:`BASELINES`) on every set of each part, ``selection`` and ``report``
(:mod:`bench.alarms.sets`: the in-distribution side of selection is the conformal null, of the
report the evaluation images; the atypical sets are split the same way).

- **Leave one model out** (:func:`leave_one_model_out`): for each model, :func:`rule` chooses a
  candidate from the *selection* part of the *other* models; the chosen candidate is reported on
  the held-out model's *report* part.
- **Leave one family out** (:func:`leave_one_family_out`): for each shift family, :func:`rule`
  chooses from the selection part of every model's sets *outside* that family; the choice is
  reported on every model's report part of the held-out family's sets.

The held-out figures are the honest ones: no figure of the held-out model (family) and no
report-part figure entered the choice.

The rule (:func:`rule`, declared once; ``seen`` = the (model, set) pairs it may look at):

1. *MNIST gate*: keep the candidates whose minimum AUROC over the seen MNIST-family sets
   (family ``far``, :data:`bench.alarms.sets.FAR`) is >= 0.95, if any candidate passes (and
   there is such a set);
2. *stay nominal*: among those, drop the candidates with ``|AUROC - 0.5| > 0.05`` on any seen
   set of the ``nominal`` family (the training augmentations, which must not alarm), if any
   candidate is left; then keep those with the highest *worst margin*: the minimum over the seen
   non-nominal sets of (candidate AUROC - the best logit baseline's, MSP / MaxLogit / Energy);
3. break ties by the number of seen non-nominal sets on which the candidate beats every
   baseline (its AUROC above each of MSP, MaxLogit, Energy, KNN, Mahalanobis present);
4. then by name (ascending), for determinism.

Margins and deviations from 0.5 are compared rounded to :data:`ROUND` decimals (so float noise
makes no difference: a margin of -0.03 is within 0.03).
A candidate must have an AUROC on every seen set (in the rotations: on every set of every
model's both parts, so that the chosen one can be reported); the others are not candidates.

The checks of the issue's "done when" on each held-out report set (:func:`set_report`):
within 0.02 of the best logit baseline on ``semantic`` sets and within 0.03 on every other
non-nominal set (below it by at most that; above it is fine), >= 0.95 on the MNIST family,
``|AUROC - 0.5| <= 0.05`` on ``nominal`` sets (instead of a margin: they must stay at chance),
and over the held-out sets (nominal ones excepted) beating KNN and every logit baseline on at
least half of them (:func:`summary`).

``python -m bench.alarms.loo`` reads ``bench/alarms/results/MODEL.json`` (the format
``python -m bench.alarms`` writes: ``parts[part]["sets"][set]["scores"][score]["auroc"]``),
writes ``bench/alarms/results/loo.json`` and prints the Markdown tables for
``bench/README.md``. Sets that :func:`bench.alarms.sets.families` does not name (the committed
results' earlier sets, e.g. ``"noise 0.08"``) get the family named by their first word.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from bench.alarms.report import family_sets_markdown
from bench.alarms.sets import FAR, families

HERE = Path(__file__).resolve().parent
PARTS = ("selection", "report")
BASELINES = ("MSP", "MaxLogit", "Energy", "KNN", "Mahalanobis")
LOGIT_BASELINES = ("MSP", "MaxLogit", "Energy")
NOMINAL, SEMANTIC, FAR_FAMILY = "nominal", "semantic", "far"
#: The rule's and the checks' thresholds (the issue's "done when").
MNIST_TARGET = 0.95
NOMINAL_TOLERANCE = 0.05
SEMANTIC_TOLERANCE = 0.02
OTHER_TOLERANCE = 0.03
ROUND = 9

#: aurocs[model][part][set][score] = AUROC
Aurocs = Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]
#: A part's AUROCs of several models: seen[model][set][score] = AUROC
Seen = Mapping[str, Mapping[str, Mapping[str, float]]]


def is_mnist(set_name: str, family_of: Mapping[str, str]) -> bool:
    """Whether a set belongs to the MNIST family (family ``far``, one of :data:`FAR`)."""
    return family_of.get(set_name) == FAR_FAMILY and set_name in FAR


def family_map(set_names: Iterable[str]) -> dict[str, str]:
    """set -> family for ``set_names``: :func:`bench.alarms.sets.families`', else the set
    name's first word (the committed results' earlier sets)."""
    known = {s: f for f, names in families().items() for s in names}
    return {s: known.get(s, s.split()[0]) for s in set_names}


def best_logit(scores: Mapping[str, float]) -> tuple[str, float]:
    """The best logit baseline on a set (name, AUROC); ties go to the first listed."""
    name = max(LOGIT_BASELINES, key=lambda b: scores[b])
    return name, float(scores[name])


def beats_baselines(scores: Mapping[str, float], score: str) -> bool:
    """Whether ``score`` is strictly above every baseline present on a set."""
    return all(scores[score] > scores[b] for b in BASELINES if b in scores)


def candidates_of(seen: Seen, baselines: Sequence[str] = BASELINES) -> list[str]:
    """The scores that are not baselines and have an AUROC on every seen set (sorted)."""
    names: set[str] | None = None
    for sets in seen.values():
        for scores in sets.values():
            here = set(scores) - set(baselines)
            names = here if names is None else names & here
    return sorted(names or ())


def rank_candidates(
    seen: Seen, family_of: Mapping[str, str], candidates: Sequence[str] | None = None
) -> list[dict]:
    """Every candidate's figures under :func:`rule` on ``seen`` (see the module docstring),
    best first: ``name``, ``mnist_min``, ``mnist_ok``, ``nominal_max_deviation``,
    ``nominal_ok``, ``worst_margin``, ``worst_set`` (``"model/set"``), ``sets_won``,
    ``kept_by`` (the last step of 1-2 that kept it: 0 none, 1 MNIST gate, 2 nominal) and
    ``rank``."""
    names = list(candidates) if candidates is not None else candidates_of(seen)
    if not names:
        raise ValueError("no candidate has an AUROC on every seen set")
    pairs = [(m, s) for m, sets in seen.items() for s in sets]
    if not pairs:
        raise ValueError("nothing seen")
    mnist = [(m, s) for m, s in pairs if is_mnist(s, family_of)]
    nominal = [(m, s) for m, s in pairs if family_of.get(s) == NOMINAL]
    other = [(m, s) for m, s in pairs if family_of.get(s) != NOMINAL]
    rows = []
    for name in names:
        row: dict = {"name": name}
        row["mnist_min"] = min((seen[m][s][name] for m, s in mnist), default=None)
        row["mnist_ok"] = row["mnist_min"] is not None and row["mnist_min"] >= MNIST_TARGET
        dev = [round(abs(seen[m][s][name] - 0.5), ROUND) for m, s in nominal]
        row["nominal_max_deviation"] = max(dev, default=None)
        row["nominal_ok"] = all(d <= NOMINAL_TOLERANCE for d in dev)
        margins = [(seen[m][s][name] - best_logit(seen[m][s])[1], f"{m}/{s}") for m, s in other]
        worst = min(margins, default=(math.inf, None))
        row["worst_margin"], row["worst_set"] = round(worst[0], ROUND), worst[1]
        row["sets_won"] = sum(beats_baselines(seen[m][s], name) for m, s in other)
        rows.append(row)
    kept = rows
    for step, key in ((1, "mnist_ok"), (2, "nominal_ok")):
        passed = [r for r in kept if r[key]]
        if passed:
            kept = passed
            for r in kept:
                r["kept_by"] = step
    for r in rows:
        r.setdefault("kept_by", 0)
    kept_names = {r["name"] for r in kept}

    def order(r: dict) -> tuple:
        """Kept first, then by worst margin, sets won (both descending), name."""
        return (r["name"] not in kept_names, -r["worst_margin"], -r["sets_won"], r["name"])

    rows.sort(key=order)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
        r["kept"] = r["name"] in kept_names
    return rows


def rule(
    aurocs_seen: Seen, family_of: Mapping[str, str], candidates: Sequence[str] | None = None
) -> str:
    """The candidate the rule chooses from ``aurocs_seen[model][set][score]`` (one part of the
    models and sets it may see): (1) MNIST gate, (2) nominal exclusion, then the highest worst
    margin over the best logit baseline, (3) the most sets beating every baseline, (4) name.
    See the module docstring."""
    return rank_candidates(aurocs_seen, family_of, candidates)[0]["name"]


def set_report(scores: Mapping[str, float], score: str, set_name: str, family: str) -> dict:
    """The issue's checks for ``score`` on one report set: its AUROC, every baseline's, the
    best logit baseline, KNN, the margin over the best logit baseline and the checks
    (``None`` where a check does not apply to the set's family)."""
    name, best = best_logit(scores)
    auroc = float(scores[score])
    row: dict = {
        "set": set_name,
        "family": family,
        "auroc": auroc,
        "baselines": {b: float(scores[b]) for b in BASELINES if b in scores},
        "best_logit": name,
        "best_logit_auroc": best,
        "knn": float(scores["KNN"]) if "KNN" in scores else None,
        "margin": auroc - best,
        "tolerance": None,
        "within": None,
        "mnist_ok": None,
        "nominal_deviation": None,
        "nominal_ok": None,
        "beats": None,
    }
    if family == NOMINAL:
        row["nominal_deviation"] = round(abs(auroc - 0.5), ROUND)
        row["nominal_ok"] = row["nominal_deviation"] <= NOMINAL_TOLERANCE
    else:
        tol = SEMANTIC_TOLERANCE if family == SEMANTIC else OTHER_TOLERANCE
        row["tolerance"] = tol
        row["within"] = round(auroc - best, ROUND) >= -tol
        row["beats"] = all(auroc > scores[b] for b in (*LOGIT_BASELINES, "KNN") if b in scores)
    if family == FAR_FAMILY and set_name in FAR:
        row["mnist_ok"] = auroc >= MNIST_TARGET
    return row


def _all(flags: Sequence[bool | None]) -> bool | None:
    """Whether every applicable check (not ``None``) holds; ``None`` when none applies."""
    applicable = [f for f in flags if f is not None]
    return all(applicable) if applicable else None


def summary(rows: Sequence[dict]) -> dict:
    """The checks over a rotation's held-out sets: every margin within tolerance, every MNIST
    set >= 0.95, every nominal set at chance, and beating KNN and the logit baselines on at
    least half the non-nominal sets (each ``None`` where no held-out set is of its kind);
    ``passed`` when none of them fails."""
    scored = [r for r in rows if r["beats"] is not None]
    won = sum(r["beats"] for r in scored)
    out = {
        "sets": len(rows),
        "within": _all([r["within"] for r in scored]),
        "missed": [f"{r['model']}/{r['set']}" for r in scored if not r["within"]],
        "mnist_ok": _all([r["mnist_ok"] for r in rows]),
        "nominal_ok": _all([r["nominal_ok"] for r in rows]),
        "beats": won,
        "beats_of": len(scored),
        "beats_half": 2 * won >= len(scored) if scored else None,
    }
    checks = ("within", "mnist_ok", "nominal_ok", "beats_half")
    out["passed"] = all(out[k] is not False for k in checks)
    return out


def _held_out(
    report: Mapping[str, Mapping[str, float]],
    chosen: str,
    family_of: Mapping[str, str],
    model: str,
    keep: Callable[[str], bool] | None = None,
) -> list[dict]:
    """The per-set reports of ``chosen`` on a model's report part (the sets ``keep`` accepts;
    all by default)."""
    return [
        {"model": model, **set_report(scores, chosen, s, family_of.get(s, "?"))}
        for s, scores in report.items()
        if keep is None or keep(s)
    ]


def _everywhere(aurocs: Aurocs) -> list[str]:
    """The candidates with an AUROC on every set of every model's both parts (so the chosen
    one can be reported on whatever is held out)."""
    return candidates_of({f"{m} {part}": aurocs[m][part] for m in aurocs for part in PARTS})


def leave_one_model_out(
    aurocs: Aurocs, family_of: Mapping[str, str], candidates: Sequence[str] | None = None
) -> list[dict]:
    """One rotation per model: chosen by :func:`rule` on the other models' selection part,
    reported on the held-out model's report part. Each: ``held_out``, ``chosen``,
    ``seen_models``, ``ranking`` (the rule's figures), ``rows`` (:func:`set_report` per set)
    and ``summary``."""
    if len(aurocs) < 2:
        raise ValueError("leave one model out needs at least two models")
    candidates = _everywhere(aurocs) if candidates is None else candidates
    out = []
    for model in aurocs:
        seen = {m: aurocs[m]["selection"] for m in aurocs if m != model}
        ranking = rank_candidates(seen, family_of, candidates)
        chosen = ranking[0]["name"]
        rows = _held_out(aurocs[model]["report"], chosen, family_of, model)
        out.append({"held_out": model, "chosen": chosen, "seen_models": sorted(seen),
                    "ranking": ranking, "rows": rows, "summary": summary(rows)})  # fmt: skip
    return out


def leave_one_family_out(
    aurocs: Aurocs, family_of: Mapping[str, str], candidates: Sequence[str] | None = None
) -> list[dict]:
    """One rotation per family (those of the selection sets, in order of appearance): chosen
    by :func:`rule` on every model's selection sets outside the family, reported on every
    model's report sets of the family. Each: ``held_out``, ``chosen``, ``ranking``, ``rows``
    and ``summary``."""
    candidates = _everywhere(aurocs) if candidates is None else candidates
    held = list(
        dict.fromkeys(family_of.get(s, "?") for m in aurocs for s in aurocs[m]["selection"])
    )
    out = []
    for family in held:

        def outside(s: str, family: str = family) -> bool:
            """Whether a set is outside the held-out family."""
            return family_of.get(s, "?") != family

        seen = {m: {s: v for s, v in aurocs[m]["selection"].items() if outside(s)} for m in aurocs}
        seen = {m: sets for m, sets in seen.items() if sets}
        ranking = rank_candidates(seen, family_of, candidates)
        chosen = ranking[0]["name"]
        rows = [
            r
            for m in aurocs
            for r in _held_out(
                aurocs[m]["report"], chosen, family_of, m, keep=lambda s: not outside(s)
            )
        ]
        out.append({"held_out": family, "chosen": chosen, "ranking": ranking, "rows": rows,
                    "summary": summary(rows)})  # fmt: skip
    return out


#: The families a user can make from their own held-out images (every family but the semantic
#: near-OOD and the far sets): all that a calibration-time choice may look at.
NOT_SYNTHETIC = (SEMANTIC, FAR_FAMILY)
#: The documented variants a calibration may choose among (issue 20, item 2): the stage
#: distances' gate, then energy alone or energy with the final layer's expectation mass.
VARIANTS = ("gated 0.01: energy", "gated 0.01: energy+mass")


def own_choice(
    aurocs: Aurocs,
    family_of: Mapping[str, str],
    variants: Sequence[str] = VARIANTS,
    held_family: str | None = None,
) -> list[dict]:
    """The calibration-time choice among ``variants``, one per model: by :func:`rule` on the
    model's *own* selection part, synthetic sets only (families outside
    :data:`NOT_SYNTHETIC`, and outside ``held_family`` when one is held out), reported on its
    report part (only ``held_family``'s sets when one is held out). Each: ``model``,
    ``chosen``, ``ranking``, ``rows`` and ``summary``. No other model's figure enters a
    choice, and no semantic or far set: a user has neither."""
    out = []
    for model in aurocs:

        def seen_set(s: str) -> bool:
            """Whether the choice may look at selection set ``s``."""
            family = family_of.get(s, "?")
            return family not in NOT_SYNTHETIC and family != held_family

        seen = {model: {s: v for s, v in aurocs[model]["selection"].items() if seen_set(s)}}
        ranking = rank_candidates(seen, family_of, variants)
        chosen = ranking[0]["name"]
        keep = None if held_family is None else (lambda s: family_of.get(s, "?") == held_family)
        rows = _held_out(aurocs[model]["report"], chosen, family_of, model, keep)
        out.append({"model": model, "held_out": held_family or model, "chosen": chosen,
                    "ranking": ranking, "rows": rows, "summary": summary(rows)})  # fmt: skip
    return out


def own_choice_by_family(
    aurocs: Aurocs, family_of: Mapping[str, str], variants: Sequence[str] = VARIANTS
) -> list[dict]:
    """:func:`own_choice` with each family held out in turn (from every model's choice):
    per family, every model's report sets of it under its own choice; ``chosen`` lists the
    models' choices."""
    held = list(
        dict.fromkeys(family_of.get(s, "?") for m in aurocs for s in aurocs[m]["selection"])
    )
    out = []
    for family in held:
        per_model = own_choice(aurocs, family_of, variants, family)
        rows = [r for rotation in per_model for r in rotation["rows"]]
        chosen = ", ".join(f"{r['model']}: {r['chosen']}" for r in per_model)
        out.append({"held_out": family, "chosen": chosen, "rows": rows, "summary": summary(rows)})
    return out


# --- Markdown -----------------------------------------------------------------------------


def _mark(ok: bool | None, missing: str = "") -> str:
    """A check's mark: ``ok``, ``**miss**`` or ``missing`` (not applicable)."""
    return missing if ok is None else ("ok" if ok else "**miss**")


def _checks(row: dict) -> str:
    """A set's checks in words."""
    parts = []
    if row["within"] is not None:
        parts.append(f"within {row['tolerance']:g}: {_mark(row['within'])}")
    if row["mnist_ok"] is not None:
        parts.append(f">= {MNIST_TARGET:g}: {_mark(row['mnist_ok'])}")
    if row["nominal_ok"] is not None:
        parts.append(f"|A - 0.5| {row['nominal_deviation']:.3f}: {_mark(row['nominal_ok'])}")
    if row["beats"] is not None:
        parts.append("beats KNN & logit" if row["beats"] else "")
    return "; ".join(p for p in parts if p)


def _table(rows: Sequence[dict], with_model: bool) -> list[str]:
    """The per-set table of a rotation."""
    head = ["model"] if with_model else []
    head += ["set", "family", "chosen", *BASELINES, "margin", "checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]] if with_model else []
        cells += [r["set"], r["family"], f"**{r['auroc']:.3f}**"]
        cells += [f"{r['baselines'][b]:.3f}" if b in r["baselines"] else "" for b in BASELINES]
        cells += [f"{r['margin']:+.3f} ({r['best_logit']})", _checks(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_line(rotation: dict) -> str:
    """One line: what was held out, chosen, and whether the checks hold."""
    s = rotation["summary"]
    missed = ", ".join(s["missed"]) if s["missed"] else "none"
    return (
        f"- held out **{rotation['held_out']}**: chose `{rotation['chosen']}`; "
        f"margins within tolerance: {_mark(s['within'], 'n/a')} (missed: {missed}); "
        f"MNIST family >= {MNIST_TARGET:g}: {_mark(s['mnist_ok'], 'n/a')}; "
        f"nominal at chance: {_mark(s['nominal_ok'], 'n/a')}; "
        f"beats KNN and the logit baselines on {s['beats']} / {s['beats_of']} sets "
        f"(half: {_mark(s['beats_half'], 'n/a')}); **{'passed' if s['passed'] else 'failed'}**"
    )


def markdown(
    by_model: Sequence[dict],
    by_family: Sequence[dict] = (),
    own: Sequence[dict] = (),
    own_by_family: Sequence[dict] = (),
) -> str:
    """Tables for ``bench/README.md``: per held-out model, the chosen candidate and every
    report set's AUROC against the baselines with the checks marked; per held-out family the
    same over every model; the same for each model's own (calibration-time) choice among the
    variants; a summary line per rotation."""
    out = []
    if own:
        out += ["## Each model's own choice among the variants (calibration time)", ""]
        out += [_summary_line(r) for r in own]
        for r in own:
            out += ["", f"### {r['model']}: chose `{r['chosen']}` on its own synthetic sets", ""]
            out += _table(r["rows"], with_model=False)
        out += ["", "### Each family held out from every model's own choice", ""]
        out += [_summary_line(r) for r in own_by_family]
        out += [""]
    out += ["## Leave one model out", ""]
    out += [_summary_line(r) for r in by_model]
    for r in by_model:
        seen = ", ".join(r["seen_models"])
        out += ["", f"### Held out: {r['held_out']} (chosen on the selection part of {seen}): "
                f"`{r['chosen']}`", ""]  # fmt: skip
        out += _table(r["rows"], with_model=False)
    if by_family:
        out += ["", "## Leave one family out", ""]
        out += [_summary_line(r) for r in by_family]
        for r in by_family:
            out += ["", f"### Held out: {r['held_out']}: `{r['chosen']}`", ""]
            out += _table(r["rows"], with_model=True)
    return "\n".join(out) + "\n"


def family_table(
    aurocs: Aurocs,
    family_of: Mapping[str, str],
    scores: Sequence[str],
    own: Sequence[dict] = (),
    part: str = "report",
) -> str:
    """Per model and score (``scores``, then the model's own choice when ``own`` is given):
    the worst margin against the best logit baseline in each family of ``part`` (bold: beyond
    the issue's tolerance), the MNIST family's minimum AUROC, the nominal sets' largest
    ``|AUROC - 0.5|`` and the sets on which the score beats KNN and every logit baseline."""
    fams = list(dict.fromkeys(family_of.get(s, "?") for m in aurocs for s in aurocs[m][part]))
    fams = [f for f in fams if f != NOMINAL]
    head = ["model", "score", *fams, "MNIST family (min)", "nominal (max abs(A-0.5))", "beats"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    chosen = {r["model"]: r["chosen"] for r in own}
    for model, sets in aurocs.items():
        shown = [(name, name) for name in scores]
        if model in chosen:
            shown.append((f"own choice: `{chosen[model]}`", chosen[model]))
        for label, name in shown:
            rows = [set_report(v, name, s, family_of.get(s, "?")) for s, v in sets[part].items()]
            cells = [model, label if label.startswith("own") else f"`{name}`"]
            for family in fams:
                here = [r for r in rows if r["family"] == family]
                worst = min(here, key=lambda r: r["margin"])
                text = f"{worst['margin']:+.3f}"
                cells.append(text if worst["within"] else f"**{text}**")
            mnist = [r["auroc"] for r in rows if r["mnist_ok"] is not None]
            low = min(mnist, default=float("nan"))
            cells.append(f"{low:.3f}" if low >= MNIST_TARGET else f"**{low:.3f}**")
            dev = max((r["nominal_deviation"] for r in rows if r["nominal_ok"] is not None),
                      default=float("nan"))  # fmt: skip
            cells.append(f"{dev:.3f}" if dev <= NOMINAL_TOLERANCE else f"**{dev:.3f}**")
            scored = [r for r in rows if r["beats"] is not None]
            won = sum(r["beats"] for r in scored)
            text = f"{won} / {len(scored)}"
            cells.append(text if 2 * won >= len(scored) else f"**{text}**")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------


def read_results(paths: Iterable[Path]) -> dict:
    """``aurocs[model][part][set][score]`` from results files of ``python -m bench.alarms``;
    files without per-score AUROCs in ``parts[part]["sets"][set]["scores"]`` are skipped."""
    aurocs: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        parts = data.get("parts") if isinstance(data, dict) else None
        if not isinstance(parts, dict) or not all(p in parts for p in PARTS):
            continue
        model = data.get("model", Path(path).stem)
        try:
            aurocs[model] = {
                part: {
                    s: {k: float(v["auroc"]) for k, v in entry["scores"].items()}
                    for s, entry in parts[part]["sets"].items()
                }
                for part in PARTS
            }
        except (KeyError, TypeError):
            continue
    return aurocs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"), help="folder of MODEL.json")
    p.add_argument("--models", default="", help="comma-separated (default: every results file)")
    p.add_argument("--out", default=None, help="default: RESULTS/loo.json")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="what each model's own choice is among"
    )
    args = p.parse_args(argv)
    folder = Path(args.results)
    names = [m for m in args.models.split(",") if m]
    paths = [folder / f"{m}.json" for m in names] if names else sorted(folder.glob("*.json"))
    aurocs = read_results(x for x in paths if x.name != "loo.json")
    if len(aurocs) < 2:
        print(f"need results of at least two models in {folder}, found {sorted(aurocs)}")
        return 1
    family_of = family_map({s for m in aurocs.values() for part in m.values() for s in part})
    by_model = leave_one_model_out(aurocs, family_of)
    by_family = leave_one_family_out(aurocs, family_of)
    everywhere = set(_everywhere(aurocs))
    variants = [v for v in args.variants.split(",") if v]
    own = own_by_family = []
    if variants and set(variants) <= everywhere:
        own = own_choice(aurocs, family_of, variants)
        own_by_family = own_choice_by_family(aurocs, family_of, variants)
    out = Path(args.out) if args.out else folder / "loo.json"
    result = {"models": sorted(aurocs), "families": family_of, "by_model": by_model,
              "by_family": by_family, "own_choice": own,
              "own_choice_by_family": own_by_family}  # fmt: skip
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(markdown(by_model, by_family, own, own_by_family))
    if own:
        shown = [s for s in ("library default", "Energy", "KNN", *variants) if s in everywhere
                 or s in ("Energy", "KNN")]  # fmt: skip
        print(family_table(aurocs, family_of, shown, own))
        tables = [s for s in ("library default", *variants) if s in everywhere]
        pages = [
            family_sets_markdown(json.loads(p.read_text()), tables)
            for p in paths
            if p.name != "loo.json" and p.stem in aurocs
        ]
        (out.parent / "sets.md").write_text(
            "# Every set: AUROC / FPR95 and the alarm rate at 1% (`python -m bench.alarms.loo`)"
            "\n\n" + "\n".join(pages)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
