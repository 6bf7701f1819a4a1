""" "Fixing" a misclassified image by suppressing surprise (the paper's Section 4.5, Figure 9).

For a misclassified image and its true label c:

1. rank superpixels by a gradient: ``method="surprise"`` uses the gradient of class c's score
   that flows only through the most surprising filter relative to c that **fired**
   (``alpha > P_cn(surprise_pct)`` and ``alpha > 0``, the furthest beyond the class's range, as
   in :func:`surprise_monitor.monitor.explain.choice.choose_filter`; when none fired, the filter
   with the highest percentile rank among those that fired, reported as
   ``filter_kind="unflagged"``). When that gradient is zero (no filter fired) there is no
   region to remove: the image is
   reported as not fixed, with ``note`` saying why, and no superpixel is zeroed (never
   superpixel 0 by a tie-break);
   ``method="vanilla"`` uses the plain input gradient of class c's score, through every filter
   and path (the paper's baseline); ``method="random"`` ranks superpixels at random (a control);
2. for each SLIC superpixel count in ``n_segments`` and each count in ``remove``, set the top
   superpixels to 0 in normalised space (each channel's mean colour) and classify again;
3. the image counts as fixed when any of those images is classified as c; the fix reported is
   the one that removes the fewest pixels (then the fewest superpixels).

Superpixels are scored as in :func:`surprise_monitor.monitor.explain.superpixels.superpixel_scores`
(sum over the region of ``max_c |g|``); the image is un-normalised for SLIC as in
:mod:`surprise_monitor.monitor.explain.explanation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from surprise_monitor.monitor.checks import one_of
from surprise_monitor.monitor.explain import superpixels
from surprise_monitor.monitor.explain.choice import most_surprising_filter
from surprise_monitor.monitor.explain.inputs import judged_on_device, one_image
from surprise_monitor.monitor.explain.saliency import input_gradient
from surprise_monitor.monitor.judge import HasJudge, Judge, judge_of

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
    note: str = ""  # why nothing was tried, e.g. the filter's gradient is zero: no region

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no arrays or tensors)."""
        return {
            "method": self.method, "label": self.label, "prediction": self.prediction,
            "fixed": self.fixed, "filter": self.filter, "filter_kind": self.filter_kind,
            "n_segments": self.n_segments, "removed": self.removed,
            "removed_pixels": None if self.mask is None else int(self.mask.sum()),
            "fixed_prediction": self.fixed_prediction,
            "attempts": [a.__dict__ for a in self.attempts], "note": self.note,
        }  # fmt: skip


@dataclass(frozen=True)
class _Candidate:
    """One image of the sweep: superpixels removed from the input."""

    n_segments: int  # SLIC's target
    segments_found: int
    removed: int
    mask: np.ndarray  # [H, W] bool: the removed pixels
    chosen: list[int]  # the removed superpixels


def fix(
    target: Judge | HasJudge,
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
    ``target`` is the judge, or a :class:`~surprise_monitor.monitor.SurpriseMonitor` (its
    ``last_report`` is left alone).

    Raises ``ValueError`` when ``x`` is already classified as ``label``.
    """
    judge = judge_of(target)
    x, label = _check_call(judge, x, label, method, n_segments, remove)
    mean_t, std_t = superpixels.normalisation(judge.table.data_source, mean, std)
    x, report = judged_on_device(judge, x, label)
    prediction = int(report.predictions[0])
    if prediction == label:
        raise ValueError(f"the image is already classified as its label {label}; nothing to fix")
    filt, filter_kind = (
        most_surprising_filter(report, judge.table, judge.thresholds.surprise_pct)
        if method == "surprise"
        else (None, None)
    )
    grad = None
    if method != "random":
        grad = input_gradient(
            judge.model, judge.layer, x, label, filt, class_output=judge.table.class_output,
            output_to_logits=judge.output_to_logits,
        )[0].float().cpu()  # fmt: skip
    image = superpixels.unnormalise(x[0].float(), mean_t, std_t)
    flat = grad is not None and not bool(grad.abs().max() > 0)
    candidates = [] if flat else _sweep(image, grad, n_segments, remove, reduce, seed, slic_kwargs)
    result = FixResult(method, label, prediction, False, filt, filter_kind)
    if grad is not None and not bool(grad.abs().max() > 0):
        who = "the input gradient" if filt is None else f"the gradient through filter {filt}"
        result.note = f"cannot fix: {who} is zero (no region to remove)"
    elif not candidates:
        result.note = "cannot fix: no superpixel stands out (every one scores the same)"
    if candidates:
        _try_candidates(judge, x, candidates, result)
    return result


def _check_call(
    judge: Judge,
    x: torch.Tensor,
    label: int,
    method: str,
    n_segments: Sequence[int],
    remove: Sequence[int],
) -> tuple[torch.Tensor, int]:
    """``(x as one image, label as an int)``, or ``ValueError`` for a bad method, sweep,
    image or label."""
    one_of("method", method, METHODS)
    x = one_image(x, "fix")
    if not n_segments or not remove or min(remove) < 1 or min(n_segments) < 1:
        raise ValueError("n_segments and remove must be non-empty lists of positive counts")
    label = int(label)
    k = judge.table.num_classes
    if not 0 <= label < k:
        raise ValueError(f"label {label} is outside the table's {k} classes")
    return x, label


def _sweep(
    image: np.ndarray,
    grad: torch.Tensor | None,
    n_segments: Sequence[int],
    remove: Sequence[int],
    reduce: str,
    seed: int,
    slic_kwargs: Mapping[str, Any] | None,
) -> list[_Candidate]:
    """Every point of the sweep: for each superpixel count (unique, in the caller's order) the
    top ``r`` superpixels by ``grad`` (at random without one), for each ``r`` in ``remove``
    that leaves some superpixel; none for a count whose superpixels all score the same."""
    rng = np.random.default_rng(seed)
    candidates: list[_Candidate] = []
    for ns in dict.fromkeys(int(v) for v in n_segments):
        if grad is None:
            segs = superpixels.segment(image, ns, **dict(slic_kwargs or {}))
            order = rng.permutation(int(segs.max()) + 1)
        else:
            segs, scores, order = superpixels.ranked_superpixels(
                image, grad, ns, reduce=reduce, slic_kwargs=slic_kwargs
            )
            if not superpixels.has_region(scores):  # a tie among all: no ranking to follow
                continue
        s = int(segs.max()) + 1
        for r in sorted(set(int(v) for v in remove)):
            if r >= s:  # removing every superpixel blanks the image: not a fix
                continue
            chosen = [int(v) for v in order[:r]]
            candidates.append(_Candidate(ns, s, r, superpixels.region_mask(segs, chosen), chosen))
    return candidates


def _try_candidates(
    judge: Judge, x: torch.Tensor, candidates: list[_Candidate], result: FixResult
) -> None:
    """Classify every candidate image and record the attempts and the best fix in ``result``:
    the one that removes the fewest pixels, then the fewest superpixels, then comes first."""
    masks = torch.from_numpy(np.stack([c.mask for c in candidates])).to(x.device)
    edited = x.expand(len(candidates), -1, -1, -1).clone()
    edited = edited.masked_fill(masks[:, None, :, :], 0.0)
    preds = _classify(judge, edited)
    best, best_key = None, None
    for i, cand in enumerate(candidates):
        pred = int(preds[i])
        ok = pred == result.label
        pixels = int(cand.mask.sum())
        attempt = FixAttempt(cand.n_segments, cand.segments_found, cand.removed, pixels, pred, ok)
        result.attempts.append(attempt)
        key = (pixels, cand.removed, i)
        if ok and (best_key is None or key < best_key):
            best, best_key = i, key
    if best is not None:
        cand = candidates[best]
        result.fixed = True
        result.n_segments, result.removed = cand.n_segments, cand.removed
        result.removed_segments = cand.chosen
        result.mask = cand.mask
        result.fixed_image = edited[best : best + 1].detach().cpu()
        result.fixed_prediction = int(preds[best])


def _classify(judge: Judge, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's predicted class for each image of ``x`` (in batches, no gradients)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            y = judge.model(x[i : i + batch_size])
            logits = judge.output_to_logits(y) if judge.output_to_logits else y
            out.append(logits.argmax(1).cpu())
    return torch.cat(out)
