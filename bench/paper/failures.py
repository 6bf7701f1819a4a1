"""Paper Sections 4.3-4.4 (Figures 7 and 8): surprise and expectation for misclassified images.

Among the misclassified test images (judged against their true class, with the table calibrated on
training images), the ones with the lowest beta that have a surprising filter that fires (``alpha >
0``: a silent filter has no region to show, see :func:`flags_of`) and the ones that have an expected
filter the class fires (``mu > 0``) are explained with
:func:`surprise_monitor.monitor.explain.explain`: the region of the image behind the filter
(filter-restricted input gradient over 50 SLIC superpixels) beside the training images that engage
the filter most, each with its own region. The table keeps the top training images per class and
filter:

- for a surprising filter (Figure 7, "the images from the training data that most activate the
  surprising filter"), the training images of the class in which the filter contributes most
  (the class holding the largest exemplar alpha for the filter): what the filter responds to;
- for an expected filter (Figure 8, "from the training data within the same class"), the *true*
  class's images that engage it most: what the network expected to see.

The filter is judged against the true class in both cases (the paper's protocol). Also reported:
how often failures and correct images have a surprising or an expected filter, and how often the
most surprising one is silent (and how many silent filters are flagged).

Run: ``python -m bench.paper.failures [--data-dir DIR] [--n-test N] [--per-kind 2]``.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

import torch

from bench.paper.beta import rate
from bench.paper.common import (
    FIGURES,
    Setup,
    arg_parser,
    inspect_all,
    load_setup,
    log,
    parse,
    store,
    test_images,
)
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.table import CalibrationTable

KINDS = ("surprise", "expectation")


def pick_failures(
    rep: dict[str, torch.Tensor],
    labels: torch.Tensor,
    kind: str,
    count: int,
    exclude: Collection[int] = (),
) -> list[int]:
    """Indices of misclassified images that have a ``kind`` filter to picture, lowest beta
    first (see :func:`flags_of`)."""
    wrong = rep["logits"].argmax(1) != labels
    has = flags_of(rep, kind).any(dim=1)
    idx = torch.nonzero(wrong & has).flatten()
    order = torch.argsort(rep["beta"][idx], stable=True)
    return [i for i in idx[order].tolist() if i not in exclude][:count]


def flags_of(rep: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """``[B, N]`` filters to picture: the surprising ones that *fire* (``alpha > 0``); the
    expected ones the class's training images fire (``mu > 0``). A filter whose class
    distribution lies below 0 (it usually lowers the class's logit) is "surprising" when it
    stays silent (``alpha = 0``): the gradient through it is then zero and there is no region to
    show; and "expected" when it is merely above the class's (negative) mean of mu: its
    training exemplars then have ``alpha <= 0`` and no region either."""
    if kind == "surprise":
        return rep[kind] & (rep["alpha"] > 0)
    return rep[kind] & (rep["mu"] > 0)


def silent_most_surprising(rep: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` bool: the most surprising filter (largest ``alpha - mu`` among the flagged ones,
    the one :func:`surprise_monitor.monitor.explain.fix` uses) has ``alpha = 0``."""
    dev = (rep["alpha"] - rep["mu"]).masked_fill(~rep["surprise"], float("-inf"))
    best = dev.argmax(dim=1)
    alpha = rep["alpha"].gather(1, best.view(-1, 1)).squeeze(1)
    return rep["surprise"].any(dim=1) & (alpha == 0)


def flag_counts(rep: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
    """How often misclassified and correct images have a surprising / an expected filter
    (rates with binomial standard errors), how many filters they have flagged on average, and
    how often their most surprising filter is a silent one (see :func:`flags_of`)."""
    wrong = (rep["logits"].argmax(1) != labels).numpy()
    out: dict[str, Any] = {"misclassified": int(wrong.sum()), "correct": int((~wrong).sum())}
    silent = silent_most_surprising(rep).numpy()
    for kind in KINDS:
        count = rep[kind].sum(1).numpy()
        for group, mask in (("wrong", wrong), ("correct", ~wrong)):
            out[f"{kind}_{group}"] = rate(count[mask] > 0)
            out[f"{kind}_{group}_mean_filters"] = float(count[mask].mean()) if mask.any() else 0.0
            if kind == "surprise":
                out[f"silent_{group}"] = rate(silent[mask & (count > 0)])
                quiet = (rep["surprise"] & (rep["alpha"] == 0)).sum(1).numpy()
                out[f"silent_{group}_mean_filters"] = (
                    float(quiet[mask].mean()) if mask.any() else 0.0
                )
    return out


def p999_below_zero(table: CalibrationTable) -> float:
    """Share of the table's (class, filter) pairs whose P99.9 lies below 0: the pairs for which
    a silent filter (``alpha = 0``) counts as surprising."""
    return float((table.value_at(99.9) < 0).double().mean())


def strongest_class(table: CalibrationTable, filt: int) -> int:
    """The class whose top training exemplar has the largest alpha for filter ``filt``: where
    in the training data the filter contributes most."""
    top = table.top_alpha[:, filt, 0].nan_to_num(float("-inf"))
    return int(top.argmax())


def explain_cases(
    setup: Setup,
    mon: SurpriseMonitor,
    x: torch.Tensor,
    y: torch.Tensor,
    rep: dict[str, torch.Tensor],
    per_kind: int,
) -> list[dict[str, Any]]:
    """The lowest-beta failures with a surprising / an expected filter, explained (figures
    written to ``figures/``)."""
    from surprise_monitor.monitor.explain import explain

    cases: list[dict[str, Any]] = []
    for kind in KINDS:
        used = {c["test_index"] for c in cases}
        for i in pick_failures(rep, y, kind, per_kind, used):
            filt = flags_of(rep, kind)[i].nonzero().flatten()
            dev = (rep["alpha"][i] - rep["mu"][i])[filt]
            best = int(filt[dev.argmax() if kind == "surprise" else dev.argmin()])
            shown = strongest_class(mon.table, best) if kind == "surprise" else int(y[i])
            expl = explain(mon, x[i], filter=best, label=int(y[i]), exemplar_class=shown)
            name = f"failure-{setup.arch}-{kind}-{i}.png"
            expl.save_figure(FIGURES / name)
            cases.append(
                {
                    "test_index": i,
                    "kind": kind,
                    "beta": float(rep["beta"][i]),
                    "flagged_filters": [int(f) for f in filt],
                    "exemplar_class": shown,
                    "exemplar_class_name": mon.table.class_names[shown],
                    "figure": name,
                    **expl.to_dict(),
                }
            )
    return cases


def run(setups: Sequence[Setup], n_test: int | None, per_kind: int = 2) -> dict[str, Any]:
    """Sections 4.3-4.4 for each model on its first ``n_test`` test images."""
    results: dict[str, Any] = {}
    for s in setups:
        started = time.perf_counter()
        n = s.n_test(n_test)
        x, y = test_images(s.data_dir, 0, n)
        log(f"failures: {s.arch} on {n} test images")
        with s.monitor("train") as mon:
            rep = inspect_all(mon, x, y)
            r: dict[str, Any] = {"title": s.title, "images": n, **flag_counts(rep, y)}
            r["p999_below_zero"] = p999_below_zero(mon.table)
            r["cases"] = explain_cases(s, mon, x, y, rep, per_kind)
        r["seconds"] = time.perf_counter() - started
        results[s.arch] = r
    return results


def _pct(r: dict[str, float]) -> str:
    """``12.3% +- 0.4`` of a :func:`bench.paper.beta.rate`."""
    return f"{100 * r['rate']:.1f}% +- {100 * r['se']:.1f}"


def _shown(case: dict[str, Any]) -> str:
    """The name of the class whose exemplars a case shows."""
    return case.get("exemplar_class_name", case["class_name"])


def markdown(results: dict[str, Any]) -> str:
    """The section of the report: flag rates, the explained cases and their figures."""
    lines = [
        "Share of test images with at least one flagged filter, judged against the true class "
        "with the training table (surprise: alpha > P99.9; expectation: alpha < P0.1 and mu "
        "above the class's mean mu), +- one binomial standard error; in brackets the mean "
        "number of flagged filters.",
        "",
        "| model | misclassified | failures with surprise | correct with surprise | "
        "failures with expectation | correct with expectation |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        cells = [
            f"{_pct(r[f'{k}_{g}'])} ({r[f'{k}_{g}_mean_filters']:.2f})"
            for k in KINDS
            for g in ("wrong", "correct")
        ]
        lines.append(
            f"| {r['title']} | {r['misclassified']} of {r['images']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "The most surprising filter (largest alpha - mu, the one the fix uses) is often a "
        "*silent* one, alpha = 0: a filter whose class distribution lies below 0 (it usually "
        "lowers the class's logit) is above its P99.9 when it does not fire at all, and the "
        "gradient through it is zero.",
        "",
    ]
    for r in results.values():
        if "silent_wrong" in r:
            lines.append(
                f"- {r['title']}: most surprising filter silent for {_pct(r['silent_wrong'])} of "
                f"the failures with a surprising filter, {_pct(r['silent_correct'])} of the "
                "correct images with one"
                + (
                    f"; silent flagged filters per image {r['silent_wrong_mean_filters']:.2f} "
                    f"(failures) and {r['silent_correct_mean_filters']:.2f} (correct); P99.9 "
                    f"below 0 for {100 * r['p999_below_zero']:.1f}% of the table's (class, "
                    "filter) pairs."
                    if "p999_below_zero" in r
                    else "."
                )
            )
    lines.append("")
    for r in results.values():
        lines += [
            f"**{r['title']}**: the misclassified test images with the lowest beta that have a "
            "surprising filter that fires (alpha > 0), then those with an expected one that "
            "the class's training images fire (mu > 0) ({:.0f} s).".format(
                r.get("seconds", float("nan"))
            ),
            "",
            "| test image | predicted (true) | beta | kind | filter | alpha (percentile)"
            " | mu | flagged filters | exemplars (class: training indices) |",
            "|---:|---|---:|---|---:|---|---:|---|---|",
        ]
        for c in r["cases"]:
            ex = ", ".join(str(e["index"]) for e in c["exemplars"])
            flagged = ", ".join(map(str, c["flagged_filters"][:8]))
            if len(c["flagged_filters"]) > 8:
                flagged += f" (+{len(c['flagged_filters']) - 8})"
            lines.append(
                f"| {c['test_index']} | {c['prediction_name']} ({c['class_name']}) | "
                f"{c['beta']:.3g} | {c['kind']} | {c['filter']} | {c['alpha']:.3g} "
                f"(P{c['percentile']:.1f}) | {c['mu']:.3g} | {flagged} | {_shown(c)}: {ex} |"
            )
        lines.append("")
        for c in r["cases"]:
            lines.append(f"![{c['kind']} for test image {c['test_index']}](figures/{c['figure']})")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run Sections 4.3-4.4, save the results and figures, print the section."""
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--per-kind", type=int, default=2, help="images per kind and model")
    args = parse(p, argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("failures", run(setups, args.n_test, args.per_kind))
    print(markdown(results))


if __name__ == "__main__":
    main()
