"""Paper Sections 4.3-4.4 (Figures 7 and 8): surprise and expectation for misclassified images.

Among the misclassified test images (judged against their true class, with the table calibrated
on training images), the ones with the lowest beta that have a surprising filter and the ones
that have an expected filter are explained with :func:`monitor.explain.explain`: the region of
the image behind the filter (filter-restricted input gradient over 50 SLIC superpixels) beside
the training images that engage the filter most, each with its own region:

both with the exemplars of the true class (the class the filter is judged against; the table
keeps the top training images per class and filter): for a surprising filter, the class's
training images in which the filter is most engaged (what, in the class's own data, fires the
filter that this image over-fires); for an expected filter, as the paper's Figure 8, the class's
images that engage the filter most (what the network expected to see).

Run: ``python -m bench.paper.failures [--data-dir DIR] [--n-test 5000] [--per-kind 2]``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

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

KINDS = ("surprise", "expectation")


def pick_failures(
    rep: dict[str, torch.Tensor],
    labels: torch.Tensor,
    kind: str,
    count: int,
    exclude: Collection[int] = (),
) -> list[int]:
    """Indices of misclassified images that have a ``kind`` filter, lowest beta first."""
    wrong = rep["logits"].argmax(1) != labels
    has = rep[kind].any(dim=1)
    idx = torch.nonzero(wrong & has).flatten()
    order = torch.argsort(rep["beta"][idx], stable=True)
    return [i for i in idx[order].tolist() if i not in exclude][:count]


def run(setups: Sequence[Setup], n_test: int, per_kind: int = 2) -> dict[str, Any]:
    from monitor.explain import explain

    results: dict[str, Any] = {}
    for s in setups:
        x, y = test_images(s.data_dir, 0, n_test)
        log(f"failures: {s.arch} on {n_test} test images")
        mon = s.monitor("train")
        try:
            rep = inspect_all(mon, x, y)
            wrong = rep["logits"].argmax(1) != y
            r: dict[str, Any] = {
                "title": s.title,
                "images": n_test,
                "misclassified": int(wrong.sum()),
                "with_surprise": int((wrong & rep["surprise"].any(1)).sum()),
                "with_expectation": int((wrong & rep["expectation"].any(1)).sum()),
                "correct_with_surprise": int((~wrong & rep["surprise"].any(1)).sum()),
                "correct_with_expectation": int((~wrong & rep["expectation"].any(1)).sum()),
                "cases": [],
            }
            for kind in KINDS:
                used = {c["test_index"] for c in r["cases"]}
                for i in pick_failures(rep, y, kind, per_kind, used):
                    filt = rep[kind][i].nonzero().flatten()
                    dev = (rep["alpha"][i] - rep["mu"][i])[filt]
                    best = int(filt[dev.argmax() if kind == "surprise" else dev.argmin()])
                    ex_cls = int(y[i])
                    expl = explain(mon, x[i], filter=best, label=ex_cls)
                    name = f"failure-{s.arch}-{kind}-{i}.png"
                    expl.save_figure(FIGURES / name)
                    r["cases"].append(
                        {
                            "test_index": i,
                            "kind": kind,
                            "beta": float(rep["beta"][i]),
                            "flagged_filters": [int(f) for f in filt],
                            "exemplar_class": ex_cls,
                            "figure": name,
                            **expl.to_dict(),
                        }
                    )
        finally:
            mon.close()
        results[s.arch] = r
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for r in results.values():
        lines.append(
            f"**{r['title']}**: {r['misclassified']} of {r['images']} test images misclassified; "
            f"{r['with_surprise']} of them have a surprising filter and {r['with_expectation']} "
            f"an expected one (against their true class); among the correct images "
            f"{r['correct_with_surprise']} and {r['correct_with_expectation']}."
        )
        lines += [
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
            names = c["class_name"], c["prediction_name"]
            ex_name = names[1] if c["exemplar_class"] == c["prediction"] else names[0]
            lines.append(
                f"| {c['test_index']} | {c['prediction_name']} ({c['class_name']}) | "
                f"{c['beta']:.3g} | {c['kind']} | {c['filter']} | {c['alpha']:.3g} "
                f"(P{c['percentile']:.1f}) | {c['mu']:.3g} | {flagged} | {ex_name}: {ex} |"
            )
        lines.append("")
        for c in r["cases"]:
            lines.append(f"![{c['kind']} for test image {c['test_index']}](figures/{c['figure']})")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--per-kind", type=int, default=2, help="images per kind and model")
    args = parse(p, argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("failures", run(setups, args.n_test, args.per_kind))
    print(markdown(results))


if __name__ == "__main__":
    main()
