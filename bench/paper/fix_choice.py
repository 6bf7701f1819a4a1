"""The fix of Section 4.5 with the explanation's filter choice (issue 25), beside the paper's.

Section 4.5 (:mod:`bench.paper.fixing`, results in ``results/fixing.json``) was run with the
paper's choice: the most surprising filter (largest ``alpha - mu`` above P99.9), silent or not;
for 65% of the ResNet-18's failures that filter did not fire (alpha = 0) and its gradient,
all zero, ranked the superpixels by their ids. The library now chooses as the explanation does
(:func:`surprise_monitor.monitor.explain.choice.most_surprising_filter`): the surprising filter
furthest beyond the class's range **that fired** (alpha > 0); when none fired, the filter with
the highest percentile rank among those that fired; and when no filter fired (the chosen
filter's gradient is zero) there is no region and the image is not fixed (never superpixel 0 by
a tie-break).

This experiment reruns every failure at 32 x 32 with that choice, the same sweep and the same
controls (vanilla and random do not depend on the choice, so their rates must equal Section
4.5's: a check that nothing else moved), and reports the rates beside Section 4.5's, by what the
choice found:

- ``fired``: a surprising filter (above P99.9) that fired;
- ``unflagged``: no surprising filter fired: the highest-percentile filter that fired;
- ``no_region``: the chosen filter's gradient is zero: no region, counted as not fixed.

Per-image rows are cached under the cache folder (``paper/fix/{arch}-{fp}-32-fired.jsonl``).

Run: ``python -m bench.paper --only fix_choice`` (or ``python -m bench.paper.fix_choice``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from bench.fix_rate import summarise
from bench.paper import common
from bench.paper.common import Setup, arg_parser, load_setup, parse, store
from bench.paper.fixing import analyse, native_rows, rate_row
from surprise_monitor.monitor.explain import METHODS

#: The rows' cache variant (beside Section 4.5's ``32``).
VARIANT = "32-fired"
#: What the choice found, in the order the table shows them.
KINDS = {
    "fired": "a surprising filter that fired",
    "unflagged": "no surprising filter fired: the highest-percentile one that fired",
    "no_region": "no filter fired: no region (not fixed)",
}


def choice_kind(row: dict[str, Any]) -> str:
    """``fired``, ``unflagged`` or ``no_region`` for one row (see the module docstring)."""
    if not row["surprise"]["attempts"]:
        return "no_region"
    return "fired" if row["filter_kind"] == "surprise" else "unflagged"


def run_model(setup: Setup, n_test: int | None) -> dict[str, Any]:
    """Every failure of one model, fixed with the explanation's filter choice."""
    started = time.perf_counter()
    n, idx, _, _, _, rows = native_rows(setup, n_test, VARIANT, "fix_choice")
    used = [r for r in rows if "skipped" not in r]
    out: dict[str, Any] = {"title": setup.title, "test_images": n, "misclassified": len(idx)}
    out["native"] = analyse(rows)
    groups = {k: [r for r in used if choice_kind(r) == k] for k in KINDS}
    out["by_choice"] = {k: summarise(v, METHODS) for k, v in groups.items() if v}
    out["choice_counts"] = {k: len(v) for k, v in groups.items()}
    out["seconds"] = out["native"]["seconds"] + time.perf_counter() - started
    return out


def run(setups: Sequence[Setup], n_test: int | None) -> dict[str, Any]:
    """The experiment for each model."""
    return {s.arch: run_model(s, n_test) for s in setups}


def _paper_choice() -> dict[str, Any]:
    """Section 4.5's results (the paper's choice), as committed."""
    path = common.RESULTS / "fixing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def same_run(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether Section 4.5's summary ``old`` and this one are of the same model and failures:
    as many images, and the same vanilla fixes (the vanilla ranking does not depend on the
    choice). A model trained again since (other weights) fails on other images."""
    methods = old.get("methods", {})
    return (
        old.get("images") == new["images"]
        and methods.get("vanilla", {}).get("fixed") == new["methods"]["vanilla"]["fixed"]
    )


def markdown(results: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """The section: the fix rate with each choice, the controls, and the new choice's
    breakdown by what it found. ``before``: Section 4.5's results (default: committed)."""
    before = _paper_choice() if before is None else before
    lines = [
        "Section 4.5's fix rerun on every failure with the filter the explanation now chooses: "
        "the surprising filter (above P99.9) furthest beyond the class's range *that fired* "
        "(alpha > 0); when none fired, the highest-percentile filter that fired; when the chosen "
        "filter's gradient is zero, no region (counted as not fixed, never superpixel 0). Same "
        "sweep, "
        "same controls: vanilla and random do not depend on the choice. +- one binomial "
        "standard error; differences paired, with McNemar's exact p-value.",
        "",
        "| model | filter choice | tried | surprise | vanilla | random | surprise - vanilla (pp) "
        "| surprise - random (pp) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, r in results.items():
        old = (before.get(arch) or {}).get("native")
        if old:
            label = "paper's: most surprising, silent or not"
            if not same_run(old, r["native"]):
                label += " (Section 4.5's run of other weights: not comparable)"
            lines.append(rate_row(r["title"], label, old))
        lines.append(rate_row(r["title"], "**fired: the explanation's (now)**", r["native"]))
        for key, name in KINDS.items():
            if key in r["by_choice"]:
                lines.append(rate_row(r["title"], f"- {name}", r["by_choice"][key]))
    lines += [
        "",
        "What changed with the choice, per model: the images whose surprise fix was decided "
        "by a filter that fired (then: the most surprising filter fired; now: some surprising "
        "filter fired).",
        "",
        "| model | failures | paper's filter fired | now a surprising filter fired | none fired "
        "| no region | surprise now - paper's (pp, unpaired) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, r in results.items():
        old = (before.get(arch) or {}).get("native", {})
        fires = (old.get("subsets", {}).get("filter_fires") or {}).get("images")
        if old and not same_run(old, r["native"]):
            fires = None  # counted on other weights' failures
        c = r["choice_counts"]
        new_p, old_p = r["native"]["methods"]["surprise"], old.get("methods", {}).get("surprise")
        delta = (
            "-"
            if not old_p or not same_run(old, r["native"])
            else f"{new_p['percent'] - old_p['percent']:+.1f} +- "
            f"{(new_p['se'] ** 2 + old_p['se'] ** 2) ** 0.5:.1f}"
        )
        lines.append(
            f"| {r['title']} | {r['native']['images']} | {'-' if fires is None else fires} | "
            f"{c['fired']} | {c['unflagged']} | {c['no_region']} | {delta} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the experiment, save the results, print the section."""
    args = parse(arg_parser(__doc__.splitlines()[0]), argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    print(markdown(store("fix_choice", run(setups, args.n_test))))


if __name__ == "__main__":
    main()
