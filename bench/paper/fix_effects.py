"""Why a fix works or not: what blanking the chosen superpixels does to the logits.

The fix-rate experiment (:mod:`bench.paper.fixing`) only sees the prediction after each edit. This
one measures, for the first ``--effect-images`` misclassified test images, SLIC at the paper's 50
superpixels, and the top ``r`` = 1, 2, 3 superpixels of each ranking (surprise, vanilla, random,
chosen exactly as :func:`surprise_monitor.monitor.explain.fix` chooses them), the change of

- the true class's logit ``O_c`` (a fix needs it to rise, relative to the others),
- the predicted class's logit ``O_p`` (or to fall),
- the margin ``O_c - O_p`` (a fix needs it above 0),

averaged over the images with standard errors, and how often the edit raises ``O_c``. The
surprising filter is surprising *for the true class* (``alpha_n = mean(dO_c/dA_n * A_n)`` far
above its training percentiles): the region behind it is, by construction, one that pushes
``O_c`` up, so blanking it is expected to lower ``O_c``; whether it lowers ``O_p`` more is the
question this answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bench.paper.common import Setup
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import input_gradient, most_surprising_filter, superpixels

EFFECT_SEGMENTS = 50
EFFECT_REMOVE = (1, 2, 3)
METHODS = ("surprise", "vanilla", "random")


def ranked_regions(
    mon: SurpriseMonitor, x: torch.Tensor, label: int, method: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(superpixel labels, superpixel ids best first)`` of one image for one method (SLIC at
    :data:`EFFECT_SEGMENTS`, gradients of the true class's logit, as the fix takes them)."""
    judge = mon.judge
    mean, std = superpixels.normalisation(judge.table.data_source)
    image = superpixels.unnormalise(x[0], mean, std)
    if method == "random":
        segs = superpixels.segment(image, EFFECT_SEGMENTS)
        return segs, np.random.default_rng(seed).permutation(int(segs.max()) + 1)
    filt = None
    if method == "surprise":
        filt, _ = most_surprising_filter(judge(x, torch.tensor([label])))
    grad = input_gradient(
        judge.model, judge.layer, x, label, filt, class_output=judge.table.class_output
    )
    segs, _, order = superpixels.ranked_superpixels(image, grad[0], EFFECT_SEGMENTS)
    return segs, order


def image_effects(
    mon: SurpriseMonitor, x: torch.Tensor, label: int, seed: int
) -> dict[str, np.ndarray]:
    """Method -> ``[len(EFFECT_REMOVE), 3]``: the change of (true logit, predicted logit,
    margin) after blanking the top r superpixels, for each r; ``x`` one normalised image."""
    x = x.unsqueeze(0) if x.ndim == 3 else x
    with torch.no_grad():
        base = mon.model(x)[0].double()
    pred = int(base.argmax())
    out = {}
    for m in METHODS:
        segs, order = ranked_regions(mon, x, label, m, seed)
        masks = [superpixels.region_mask(segs, order[:r]) for r in EFFECT_REMOVE]
        edited = x.expand(len(masks), -1, -1, -1).clone()
        edited = edited.masked_fill(torch.from_numpy(np.stack(masks))[:, None], 0.0)
        with torch.no_grad():
            z = mon.model(edited).double()
        d_true, d_pred = z[:, label] - base[label], z[:, pred] - base[pred]
        out[m] = torch.stack([d_true, d_pred, d_true - d_pred], dim=1).numpy()
    return out


def run_effects(setup: Setup, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> dict:
    """The mean logit changes of every method over the test images ``indices`` (``x``, ``y``:
    those images and their true labels)."""
    per: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    with setup.monitor("train") as mon:
        for j, i in enumerate(indices):
            for m, v in image_effects(mon, x[j], int(y[j]), seed=int(i)).items():
                per[m].append(v)
    out: dict[str, Any] = {"images": len(indices), "n_segments": EFFECT_SEGMENTS,
                           "remove": list(EFFECT_REMOVE), "methods": {}}  # fmt: skip
    for m, vals in per.items():
        a = np.stack(vals)  # [images, r, 3]
        n = max(len(a), 1)
        out["methods"][m] = {
            name: {"mean": a[:, :, k].mean(0).tolist(),
                   "se": (a[:, :, k].std(0, ddof=1) / np.sqrt(n)).tolist() if n > 1 else None}
            for k, name in enumerate(("true_logit", "predicted_logit", "margin"))
        }  # fmt: skip
        out["methods"][m]["true_logit_up"] = (a[:, :, 0] > 0).mean(0).tolist()
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    """Table lines: per model, method and r, the mean changes (+- standard errors)."""
    lines = [
        "| model | method | superpixels blanked (of 50) | change of true logit | change of "
        "predicted logit | change of margin (true - predicted) | true logit rises |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        e = r.get("effects")
        if not e:
            continue
        for m in METHODS:
            v = e["methods"][m]
            for j, k in enumerate(e["remove"]):
                cells = [_mean_se(v[q], j) for q in ("true_logit", "predicted_logit", "margin")]
                lines.append(
                    f"| {r['title']} | {m} | {k} | " + " | ".join(cells)
                    + f" | {100 * v['true_logit_up'][j]:.0f}% |"
                )  # fmt: skip
    return lines


def _mean_se(stat: dict[str, Any], j: int) -> str:
    """``mean +- se`` of one cell; the standard error is absent (None) for a single image."""
    se = stat["se"]
    return f"{stat['mean'][j]:+.2f}" + (f" +- {se[j]:.2f}" if se is not None else " (one image)")
