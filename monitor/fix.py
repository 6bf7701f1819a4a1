""""Fixing" a misclassified image by suppressing surprise (the paper's Section 4.5, Figure 9).

For a misclassified image and its true label c:

1. rank superpixels by a gradient: ``method="surprise"`` uses the gradient of class c's score
   that flows only through the most surprising filter relative to c (largest ``alpha - mu``
   among filters with ``alpha > P_cn(surprise_pct)``; when none is flagged, the filter with
   the highest percentile rank, reported as ``filter_kind="unflagged"``);
   ``method="vanilla"`` uses the plain input gradient of class c's score, through every filter
   and path (the paper's baseline); ``method="random"`` ranks superpixels at random (a control);
2. for each SLIC superpixel count in ``n_segments`` and each count in ``remove``, set the top
   superpixels to 0 in normalised space (each channel's mean colour) and classify again;
3. the image counts as fixed when any of those images is classified as c; the fix reported is
   the one that removes the fewest pixels (then the fewest superpixels).

Superpixels are scored as in :func:`monitor.superpixels.superpixel_scores` (sum over the region
of ``max_c |g|``); the image is un-normalised for SLIC as in :mod:`monitor.explain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monitor.saliency import input_gradient
from monitor.superpixels import (
    normalisation,
    ranked_segments,
    region_mask,
    segment,
    superpixel_scores,
    unnormalise,
)

if TYPE_CHECKING:
    from monitor.surprise_monitor import SurpriseMonitor

METHODS = ("surprise", "vanilla", "random")
DEFAULT_N_SEGMENTS: tuple[int, ...] = (10, 25, 50, 100)
DEFAULT_REMOVE: tuple[int, ...] = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class FixAttempt:
    """One point of the sweep."""

    n_segments: int  # SLIC's target
    segments_found: int  # superpixels SLIC produced
    removed: int  # superpixels set to 0
    removed_pixels: int
    prediction: int
    fixed: bool


@dataclass
class FixResult:
    """Whether and how one image was fixed by one method."""

    method: str
    label: int
    prediction: int  # before any removal
    fixed: bool
    filter: int | None  # the surprising filter (method="surprise")
    filter_kind: str | None  # "surprise" (flagged) or "unflagged"
    n_segments: int | None = None  # of the reported fix
    removed: int | None = None  # superpixels removed by the reported fix
    removed_segments: list[int] = field(default_factory=list)
    mask: np.ndarray | None = field(default=None, repr=False)  # [H, W] bool: removed pixels
    fixed_image: torch.Tensor | None = field(default=None, repr=False)  # [1, C, H, W] normalised
    fixed_prediction: int | None = None
    attempts: list[FixAttempt] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "label": self.label, "prediction": self.prediction,
            "fixed": self.fixed, "filter": self.filter, "filter_kind": self.filter_kind,
            "n_segments": self.n_segments, "removed": self.removed,
            "removed_pixels": None if self.mask is None else int(self.mask.sum()),
            "fixed_prediction": self.fixed_prediction,
            "attempts": [a.__dict__ for a in self.attempts],
        }  # fmt: skip


def most_surprising_filter(report: Any) -> tuple[int, str]:
    """``(filter, kind)`` for sample 0: the most surprising filter, else the highest-percentile
    one (``"unflagged"``)."""
    sur = report.surprising_filters(0)
    if sur:
        return sur[0].filter, "surprise"
    pct, dev = report.percentile[0].double(), report.deviation[0].double()
    n = int(report.alpha.shape[1])
    return max(range(n), key=lambda i: (float(pct[i]), float(dev[i]))), "unflagged"


def _classify(monitor: SurpriseMonitor, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    to_logits = monitor.probe.output_to_logits
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            y = monitor.model(x[i : i + batch_size])
            out.append((to_logits(y) if to_logits else y).argmax(1).cpu())
    return torch.cat(out)


def fix(
    monitor: SurpriseMonitor,
    x: torch.Tensor,
    label: int,
    *,
    method: str = "surprise",
    n_segments: Sequence[int] = DEFAULT_N_SEGMENTS,
    remove: Sequence[int] = DEFAULT_REMOVE,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    reduce: str = "sum",
    seed: int = 0,
    slic_kwargs: Mapping[str, Any] | None = None,
) -> FixResult:
    """Try to make a misclassified image ``x`` (normalised, ``[C, H, W]`` or ``[1, C, H, W]``)
    classify as its true ``label`` by zeroing its top superpixels; see the module docstring.

    Raises ``ValueError`` when ``x`` is already classified as ``label``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"fix takes one image, [C, H, W] or [1, C, H, W]; got {tuple(x.shape)}")
    if not n_segments or not remove or min(remove) < 1 or min(n_segments) < 1:
        raise ValueError("n_segments and remove must be non-empty lists of positive counts")
    table = monitor.table
    label = int(label)
    if not 0 <= label < table.num_classes:
        raise ValueError(f"label {label} is outside the table's {table.num_classes} classes")
    mean_t, std_t = normalisation(table.data_source, mean, std)
    device = next(iter(monitor.model.parameters()), torch.empty(0)).device
    x = x.to(device)

    previous = monitor.last_report
    with torch.inference_mode(False):  # normal label tensors, even in a caller's inference_mode
        report = monitor.inspect(x, labels=torch.tensor([label]))
    monitor.last_report = previous
    prediction = int(report.predictions[0])
    if prediction == label:
        raise ValueError(f"the image is already classified as its label {label}; nothing to fix")

    filt: int | None = None
    filter_kind: str | None = None
    grad = None
    if method == "surprise":
        filt, filter_kind = most_surprising_filter(report)
    if method != "random":
        grad = input_gradient(
            monitor.model, table.layer, x, label, filt, score=table.score,
            output_to_logits=monitor.probe.output_to_logits,
        )[0].cpu()  # fmt: skip
    image = unnormalise(x[0], mean_t, std_t)
    rng = np.random.default_rng(seed)

    candidates: list[tuple[int, int, int, np.ndarray, list[int]]] = []
    for ns in dict.fromkeys(int(v) for v in n_segments):  # unique, in the caller's order
        segs = segment(image, ns, **dict(slic_kwargs or {}))
        s = int(segs.max()) + 1
        if grad is None:
            order = rng.permutation(s)
        else:
            order = ranked_segments(superpixel_scores(grad, segs, reduce=reduce))
        for r in sorted(set(int(v) for v in remove)):
            if r >= s:  # removing every superpixel blanks the image: not a fix
                continue
            chosen = [int(v) for v in order[:r]]
            candidates.append((ns, s, r, region_mask(segs, chosen), chosen))

    result = FixResult(method, label, prediction, False, filt, filter_kind)
    if not candidates:
        return result
    masks = torch.from_numpy(np.stack([c[3] for c in candidates])).to(device)
    edited = x.expand(len(candidates), -1, -1, -1).clone()
    edited = edited.masked_fill(masks[:, None, :, :], 0.0)
    preds = _classify(monitor, edited)
    best, best_key = None, None
    for i, (ns, s, r, mask, _) in enumerate(candidates):
        ok = int(preds[i]) == label
        result.attempts.append(FixAttempt(ns, s, r, int(mask.sum()), int(preds[i]), ok))
        key = (int(mask.sum()), r, i)  # fewest pixels, then fewest superpixels, then sweep order
        if ok and (best_key is None or key < best_key):
            best, best_key = i, key
    if best is not None:
        ns, _, r, mask, chosen = candidates[best]
        result.fixed = True
        result.n_segments, result.removed, result.removed_segments = ns, r, chosen
        result.mask = mask
        result.fixed_image = edited[best : best + 1].detach().cpu()
        result.fixed_prediction = int(preds[best])
    return result
