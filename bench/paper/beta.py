"""Paper Section 4.2: beta against the class score, and beta of failed against correct images.

For each test image, beta (Equation 2) is computed with the table calibrated on the training
images, judged against its true class (as the paper does) and against its predicted class (as
a deployed monitor does). Reported per model and judging:

- the Spearman correlation of beta with the judged class's logit (pre-softmax) and with its
  softmax probability (post-softmax), within each class, averaged over the classes
  (paper: 0.998 / 0.782 for VGG16, 0.999 / 0.801 for ResNet50 on ImageNet);
- the share of misclassified and of correctly classified images with a negative beta, with
  binomial standard errors (paper: 86.60% / 45.88% for VGG16, 90.20% / 47.67% for ResNet50).

Two experiments explain the differences:

- *What beta leaves out of the logit.* The head after the final convolution is piecewise affine
  (batch norm in eval mode, ReLU, pooling, linear layers, a residual sum), so within one ReLU
  pattern ``O_c = sum_{n,ij} dO_c/dA * A + r`` and ``HW * sum_n alpha_n = O_c - r``: beta is,
  within a class, an increasing affine function of ``O_c - r``. ``r`` (bias, batch-norm shift and
  what a shortcut carries around the layer) is the part of the logit beta cannot see; we report
  ``Spearman(beta, O_c - r)`` (1 up to ties: a check) and ``std(r) / std(O_c)`` within classes.
- *Calibrating on images the model fitted.* For the strong models (100% training accuracy for
  the ResNet) the class means mu come from training images the network fits better than new
  ones. The held-out table (test images 0..4,999) against the training table, both reported on
  test images 5,000..9,999.

Run: ``python -m bench.paper.beta [--data-dir DIR] [--n-test 5000]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from bench.paper.common import (
    Setup,
    arg_parser,
    cached_part,
    inspect_all,
    layer_hw,
    load_setup,
    log,
    new_figure,
    parse,
    save_figure,
    store,
    test_images,
)
from bench.paper.metrics import per_class_spearman
from bench.strong_tables import strong_table
from surprise_monitor.monitor import SurpriseMonitor

#: The input of each strong model's pooling-and-linear head: the last block's output (after
#: the residual sum and its ReLU) for the ResNet, the final ReLU for the VGG. With alpha taken
#: there the head is affine: ``HW * sum_n alpha_n = O_c - b_c``.
HEAD_INPUT = {"resnet18": "layer4", "vgg_bn": "features.26"}
#: The paper's figures: (Spearman pre-softmax, post-softmax, % of failures with beta < 0,
#: % of correct images with beta < 0).
PAPER = {"VGG16": (0.998, 0.782, 86.60, 45.88), "ResNet50": (0.999, 0.801, 90.20, 47.67)}


def rate(hits: np.ndarray) -> dict[str, float]:
    """Share of true values in a bool array, its binomial standard error and the count."""
    n = int(hits.size)
    p = float(hits.mean()) if n else float("nan")
    se = float(np.sqrt(p * (1.0 - p) / n)) if n else float("nan")
    return {"rate": p, "se": se, "n": n}


def _mean(values: Iterable[float]) -> float:
    """The mean, NaN for no values (classes too small for a correlation)."""
    v = list(values)
    return float(np.mean(v)) if v else float("nan")


def beta_statistics(
    beta: torch.Tensor,
    logits: torch.Tensor,
    judged: torch.Tensor,
    truth: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The Section 4.2 figures for betas judged against the classes ``judged`` (true labels or
    predictions); ``truth`` says which images are misclassified. ``residual``: the part ``r``
    of the judged logit that beta does not see (see the module docstring)."""
    b = beta.double().numpy()
    k = judged.numpy()
    logit_c = logits.double().gather(1, judged.view(-1, 1)).squeeze(1).numpy()
    soft_c = torch.softmax(logits.double(), 1).gather(1, judged.view(-1, 1)).squeeze(1).numpy()
    correct = logits.argmax(1).numpy() == truth.numpy()
    pre = per_class_spearman(b, logit_c, k)
    post = per_class_spearman(b, soft_c, k)
    out: dict[str, Any] = {
        "images": int(len(k)),
        "accuracy": float(correct.mean()),
        "spearman_pre_softmax": _mean(pre.values()),
        "spearman_post_softmax": _mean(post.values()),
        "spearman_pre_by_class": pre,
        "spearman_post_by_class": post,
        "negative_beta_wrong": rate(b[~correct] < 0),
        "negative_beta_correct": rate(b[correct] < 0),
    }
    if residual is not None:
        r = residual.double().numpy()
        seen = per_class_spearman(b, logit_c - r, k)
        ratios = [np.std(r[k == c]) / np.std(logit_c[k == c]) for c in np.unique(k)
                  if (k == c).sum() > 2 and np.std(logit_c[k == c]) > 0]  # fmt: skip
        out["spearman_seen_logit"] = _mean(seen.values())
        out["residual_std_ratio"] = _mean(ratios)
    return out


def residual_of(rep: dict[str, torch.Tensor], judged: torch.Tensor, hw: int) -> torch.Tensor:
    """``r = O_c - HW * sum_n alpha_n``: the judged logit that does not pass through the
    filters' Grad-AMaps (alpha from the logit, the monitor's default score)."""
    logit_c = rep["logits"].double().gather(1, judged.view(-1, 1)).squeeze(1)
    return logit_c - hw * rep["alpha"].double().sum(dim=1)


def judged_both_ways(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Beta with the training table against the true class and against the prediction."""
    hw = layer_hw(setup.model, setup.table("train").layer, x[:1])
    with setup.monitor("train") as mon:
        rep = inspect_all(mon, x, y)
        pred = rep["logits"].argmax(1)
        rep_pred = inspect_all(mon, x, pred)
    out = {
        "true": beta_statistics(rep["beta"], rep["logits"], y, y, residual_of(rep, y, hw)),
        "pred": beta_statistics(
            rep_pred["beta"], rep_pred["logits"], pred, y, residual_of(rep_pred, pred, hw)
        ),
        "_arrays": {
            "beta": rep["beta"].tolist(),
            "labels": y.tolist(),
            "logits": rep["logits"].tolist(),
        },
    }
    return out


def train_against_heldout(setup: Setup, n_test: int) -> dict[str, Any]:
    """Beta against the true class with the training and the held-out table, on test images
    no table saw (see :meth:`Setup.heldout_range`)."""
    start, stop = setup.heldout_range(n_test)
    x, y = test_images(setup.data_dir, start, stop)
    out: dict[str, Any] = {"test_range": [start, stop]}
    for split in ("train", "heldout"):
        with setup.monitor(split) as mon:
            rep = inspect_all(mon, x, y)
        out[split] = beta_statistics(rep["beta"], rep["logits"], y, y)
    return out


def at_head_input(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Beta with alpha taken at the input of the model's pooling-and-linear head
    (:data:`HEAD_INPUT`), from a table on training images 0..9,999."""
    layer = HEAD_INPUT[setup.arch]
    table = strong_table(setup.arch, "train10k", model=setup.model, data_dir=setup.data_dir,
                         layer=layer, log=log)  # fmt: skip
    hw = layer_hw(setup.model, layer, x[:1])
    with SurpriseMonitor(setup.model, table) as mon:
        rep = inspect_all(mon, x, y)
        pred = rep["logits"].argmax(1)
        rep_pred = inspect_all(mon, x, pred)
    return {
        "layer": layer,
        "table_images": int(table.counts.sum()),
        "_beta": rep["beta"].tolist(),  # against the true class, for the figure
        "true": beta_statistics(rep["beta"], rep["logits"], y, y, residual_of(rep, y, hw)),
        "pred": beta_statistics(
            rep_pred["beta"], rep_pred["logits"], pred, y, residual_of(rep_pred, pred, hw)
        ),
    }


def run(setups: Sequence[Setup], n_test: int | None) -> dict[str, Any]:
    """Section 4.2 for each model on its first ``n_test`` test images (each part cached)."""
    results: dict[str, Any] = {}
    for s in setups:
        started = time.perf_counter()
        n = s.n_test(n_test)
        x, y = test_images(s.data_dir, 0, n)
        log(f"beta: {s.arch} on {n} test images")
        r: dict[str, Any] = {
            "title": s.title,
            **cached_part(s, f"beta-judged-{n}", lambda s=s, x=x, y=y: judged_both_ways(s, x, y)),
            "tables": cached_part(
                s, f"beta-tables-{n}", lambda s=s, n=n: train_against_heldout(s, n)
            ),
        }
        if s.arch in HEAD_INPUT:
            r["head_input"] = cached_part(
                s, f"beta-head-input-v2-{n}", lambda s=s, x=x, y=y: at_head_input(s, x, y)
            )
            r["_arrays"]["head_beta"] = r["head_input"].pop("_beta")
        parts = [r, r["tables"], r.get("head_input", {})]  # compute time of each (cached) part
        r["seconds"] = sum(p.get("seconds", 0.0) for p in parts) or time.perf_counter() - started
        results[s.arch] = r
    return results


def plot(results: dict[str, Any]) -> str:
    """Figure 4 (``beta.png``, alpha at the final convolution) and, when every model has it,
    the same with alpha at the head's input (``beta-head-input.png``); returns the first's
    file name."""
    name = scatter(results, "beta", "beta")
    if all("head_beta" in r["_arrays"] for r in results.values()):
        scatter(results, "head_beta", "beta-head-input")
    return name


def scatter(results: dict[str, Any], key: str, stem: str) -> str:
    """Figure 4's layout: beta (``_arrays[key]``) against the score before (top) and after
    (bottom) softmax, for all classes (left) and one class (right: the class with the most
    images both right and wrong), per model; saved as ``figures/{stem}.png``."""
    archs = list(results)
    fig = new_figure(4.0 * 2 * len(archs), 6.4)
    for j, a in enumerate(archs):
        arr = results[a]["_arrays"]
        beta = np.asarray(arr[key])
        where = f", alpha at {results[a]['head_input']['layer']}" if key == "head_beta" else ""
        y = np.asarray(arr["labels"])
        logits = torch.tensor(arr["logits"], dtype=torch.float64)
        pre = logits.gather(1, torch.from_numpy(y).view(-1, 1)).squeeze(1).numpy()
        post = torch.softmax(logits, 1).gather(1, torch.from_numpy(y).view(-1, 1)).squeeze(1)
        wrong = logits.argmax(1).numpy() != y
        both = [min(np.sum((y == k) & wrong), np.sum((y == k) & ~wrong)) for k in range(10)]
        one_class = int(np.argmax(both))
        for row, (score, name) in enumerate(
            ((pre, "logit (pre-softmax)"), (post.numpy(), "softmax (post-softmax)"))
        ):
            for col, mask in enumerate((np.ones_like(y, bool), y == one_class)):
                ax = fig.add_subplot(2, 2 * len(archs), row * 2 * len(archs) + 2 * j + col + 1)
                ax.scatter(
                    beta[mask & ~wrong],
                    score[mask & ~wrong],
                    s=2,
                    alpha=0.3,
                    label="correct",
                    color="tab:blue",
                )
                ax.scatter(
                    beta[mask & wrong],
                    score[mask & wrong],
                    s=2,
                    alpha=0.3,
                    label="misclassified",
                    color="tab:red",
                )
                ax.axvline(0, color="k", lw=0.5)
                which = "all classes" if col == 0 else f"class {one_class} only"
                ax.set_title(f"{results[a]['title']}{where}\n{which}", fontsize=8)
                ax.set_xlabel("beta", fontsize=8)
                ax.set_ylabel(name, fontsize=8)
                ax.tick_params(labelsize=7)
                if row == 0 and col == 0:
                    ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    return save_figure(fig, stem).name


def _pct(r: dict[str, float]) -> str:
    """``12.3% +- 0.4`` (percentage points) of a :func:`rate`."""
    return f"{100 * r['rate']:.1f}% +- {100 * r['se']:.1f}"


def _judgings(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(row title, how judged, statistics)`` of every model and layer."""
    rows = []
    for r in results.values():
        for part, title in ((r, r["title"]), (r.get("head_input"), None)):
            if not part:
                continue
            title = title or f"{r['title']}, alpha at `{part['layer']}`"
            for who, name in (("true", "true class"), ("pred", "prediction")):
                rows.append((title, name, part[who]))
    return rows


def markdown(results: dict[str, Any], figure: str | None = "beta.png") -> str:
    """The section of the report: the tables beside the paper's, the experiments, the figure."""
    lines = [
        "Table calibrated on the training images; every test image judged against its true "
        "class (the paper's protocol) and against its predicted class (as deployed). Rates are "
        "+- one binomial standard error (percentage points).",
        "",
        "| model | judged against | images | accuracy | Spearman pre-softmax | Spearman "
        "post-softmax | failures with beta < 0 | correct with beta < 0 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for title, name, s in _judgings(results):
        lines.append(
            f"| {title} | {name} | {s['images']} | {s['accuracy']:.3f} | "
            f"{s['spearman_pre_softmax']:.3f} | {s['spearman_post_softmax']:.3f} | "
            f"{_pct(s['negative_beta_wrong'])} | {_pct(s['negative_beta_correct'])} |"
        )
    for name, (pre, post, wrong, right) in PAPER.items():
        lines.append(
            f"| paper: {name}, ImageNet | true class | 50000 | - | {pre:.3f} | {post:.3f} | "
            f"{wrong:.2f}% | {right:.2f}% |"
        )
    lines += [
        "",
        "Rows marked *alpha at `layer`*: the same with alpha taken at the input of the "
        "model's pooling-and-linear head instead of the final convolution (a table on "
        "training images 0..9,999 at that layer).",
        "",
        "What beta does not see: within a class, beta is an increasing affine function of "
        "`O_c - r`, where `r` is the part of the logit that does not pass through the "
        "layer's Grad-AMaps (bias, batch-norm shift, a residual shortcut).",
        "",
        "| model | judged against | Spearman(beta, logit) | Spearman(beta, logit - r) | "
        "std(r) / std(logit) within a class |",
        "|---|---|---:|---:|---:|",
    ]
    for title, name, s in _judgings(results):
        lines.append(
            f"| {title} | {name} | {s['spearman_pre_softmax']:.3f} | "
            f"{s['spearman_seen_logit']:.3f} | {s['residual_std_ratio']:.3f} |"
        )
    lines += [
        "",
        "Training against held-out calibration (true class; both tables judged on the same "
        "test images, which neither saw):",
        "",
        "| model | table | test images | failures with beta < 0 | correct with beta < 0 |",
        "|---|---|---|---:|---:|",
    ]
    for r in results.values():
        t = r["tables"]
        a, b = t["test_range"]
        for split in ("train", "heldout"):
            s = t[split]
            lines.append(
                f"| {r['title']} | {split} | {a:,}..{b - 1:,} | "
                f"{_pct(s['negative_beta_wrong'])} | {_pct(s['negative_beta_correct'])} |"
            )
    lines.append("")
    lines += [f"- {r['title']}: {r['seconds']:.0f} s." for r in results.values()]
    if figure:
        lines += ["", f"![beta against the class score](figures/{figure})"]
        if all("head_input" in r for r in results.values()):
            head = figure.replace("beta", "beta-head-input")
            lines += [
                "",
                "The same with alpha at the head's input (beta judged against the true class):",
                "",
                f"![beta at the head's input against the class score](figures/{head})",
            ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run Section 4.2, save the results and the figure, print the section."""
    args = parse(arg_parser(__doc__.splitlines()[0]), argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("beta", run(setups, args.n_test))
    plot(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
