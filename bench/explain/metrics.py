"""Scores of one saliency map against an artefact mask, and Wilson intervals for hit rates."""

from __future__ import annotations

import math

import numpy as np

from surprise_monitor.monitor.explain import superpixels


def pointing_hit(saliency: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the argmax pixel of ``saliency`` (``[H, W]``) lies inside ``mask``; a constant map
    (all zero: nothing to point at) is a miss, never pixel 0."""
    if not saliency.max() > saliency.min():
        return False
    return bool(mask.reshape(-1)[int(np.argmax(saliency))])


def mass_share(saliency: np.ndarray, mask: np.ndarray) -> float:
    """The share of the (non-negative) saliency mass inside ``mask`` (0 for an all-zero map)."""
    total = float(saliency.sum())
    return float(saliency[mask].sum()) / total if total > 0 else 0.0


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for ``k`` hits out of ``n`` (``(0, 1)`` for
    ``n = 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict[str, float | int]:
    """``k / n`` with its Wilson interval, as a JSON-ready dict."""
    low, high = wilson(k, n)
    return {"hits": k, "n": n, "rate": k / n if n else float("nan"), "low": low, "high": high}


def top_region(saliency: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Bool ``[H, W]``: the superpixel of ``segments`` with the most saliency mass (the sum
    over its pixels, as the monitor ranks its own regions); empty when every superpixel scores
    the same (a constant map points at no region)."""
    scores = np.bincount(segments.ravel(), weights=saliency.ravel(), minlength=segments.max() + 1)
    top = superpixels.top_region(scores)
    return np.zeros(segments.shape, bool) if top is None else segments == top
