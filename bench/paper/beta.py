"""Paper Section 4.2: beta against the class score, and beta of failed against correct images.

For each test image, beta (Equation 2) is computed against its true class (as the paper does)
with the table calibrated on training images. Reported per model:

- the Spearman correlation of beta with the true class's logit (pre-softmax) and with its
  softmax probability (post-softmax), within each class, averaged over the classes
  (paper: 0.998 / 0.782 for VGG16, 0.999 / 0.801 for ResNet50 on ImageNet);
- the share of misclassified and of correctly classified images with a negative beta
  (paper: 86.60% / 45.88% for VGG16, 90.20% / 47.67% for ResNet50).

The same figures with the held-out table are given for comparison (beta only depends on the
table through the class means mu).

Run: ``python -m bench.paper.beta [--data-dir DIR] [--n-test 5000]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.paper.common import (
    Setup,
    arg_parser,
    inspect_all,
    load_setup,
    log,
    new_figure,
    parse,
    save_figure,
    store,
    test_images,
)
from bench.paper.metrics import per_class_spearman

#: The paper's figures: (Spearman pre-softmax, post-softmax, % of failures with beta < 0,
#: % of correct images with beta < 0).
PAPER = {"VGG16": (0.998, 0.782, 86.60, 45.88), "ResNet50": (0.999, 0.801, 90.20, 47.67)}


def beta_statistics(beta: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The Section 4.2 figures for betas judged against the true ``labels``."""
    b = beta.double().numpy()
    y = labels.numpy()
    logit_c = logits.double().gather(1, labels.view(-1, 1)).squeeze(1).numpy()
    soft_c = torch.softmax(logits.double(), 1).gather(1, labels.view(-1, 1)).squeeze(1).numpy()
    correct = logits.argmax(1).numpy() == y
    pre = per_class_spearman(b, logit_c, y)
    post = per_class_spearman(b, soft_c, y)
    return {
        "images": int(len(y)),
        "accuracy": float(correct.mean()),
        "spearman_pre_softmax": float(np.mean(list(pre.values()))),
        "spearman_post_softmax": float(np.mean(list(post.values()))),
        "spearman_pre_by_class": pre,
        "spearman_post_by_class": post,
        "negative_beta_wrong": float((b[~correct] < 0).mean())
        if (~correct).any()
        else float("nan"),
        "negative_beta_correct": float((b[correct] < 0).mean()) if correct.any() else float("nan"),
    }


def run(setups: Sequence[Setup], n_test: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for s in setups:
        x, y = test_images(s.data_dir, 0, n_test)
        log(f"beta: {s.arch} on {n_test} test images")
        r: dict[str, Any] = {"title": s.title}
        for split in ("train", "heldout"):
            with s.monitor(split) as mon:
                rep = inspect_all(mon, x, y)
            r[split] = beta_statistics(rep["beta"], rep["logits"], y)
            if split == "train":
                r["_arrays"] = {
                    "beta": rep["beta"].tolist(),
                    "labels": y.tolist(),
                    "logits": rep["logits"].tolist(),
                }
        results[s.arch] = r
    return results


def plot(results: dict[str, Any]) -> str:
    """Figure 4's layout: beta against the score before (top) and after (bottom) softmax, for
    all classes (left) and one class (right: the class with the most images both right and
    wrong), per model."""
    archs = list(results)
    fig = new_figure(4.0 * 2 * len(archs), 6.4)
    for j, a in enumerate(archs):
        arr = results[a]["_arrays"]
        beta = np.asarray(arr["beta"])
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
                ax.set_title(f"{results[a]['title']}\n{which}", fontsize=8)
                ax.set_xlabel("beta", fontsize=8)
                ax.set_ylabel(name, fontsize=8)
                ax.tick_params(labelsize=7)
                if row == 0 and col == 0:
                    ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    return save_figure(fig, "beta").name


def markdown(results: dict[str, Any], figure: str | None = "beta.png") -> str:
    lines = [
        "| model | table | images | accuracy | Spearman pre-softmax | Spearman post-softmax "
        "| failures with beta < 0 | correct with beta < 0 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        for split in ("train", "heldout"):
            s = r[split]
            lines.append(
                f"| {r['title']} | {split} | {s['images']} | {s['accuracy']:.3f} | "
                f"{s['spearman_pre_softmax']:.3f} | {s['spearman_post_softmax']:.3f} | "
                f"{100 * s['negative_beta_wrong']:.1f}% | {100 * s['negative_beta_correct']:.1f}% |"
            )
    for name, (pre, post, wrong, right) in PAPER.items():
        lines.append(
            f"| paper: {name}, ImageNet | train | 50000 | - | {pre:.3f} | {post:.3f} | "
            f"{wrong:.2f}% | {right:.2f}% |"
        )
    if figure:
        lines += ["", f"![beta against the class score](figures/{figure})"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(arg_parser(__doc__.splitlines()[0]), argv)
    setups = [load_setup(a, args.data_dir) for a in args.archs]
    results = store("beta", run(setups, args.n_test))
    plot(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
