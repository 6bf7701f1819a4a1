"""Evaluation helpers: AUROC, FPR at 95% TPR, area under a removal curve, per-class Spearman.

Detection convention (as pytorch-ood's ``OODMetrics``): the atypical inputs are the positive
class and a higher score means "more atypical".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr


def _scores(name: str, values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or Inf values")
    return a


def auroc(inlier, outlier) -> float:
    """Area under the ROC curve for telling ``outlier`` (positive) from ``inlier`` scores:
    the probability that a random outlier scores above a random inlier, ties counting half
    (the Mann-Whitney statistic, from average ranks)."""
    neg, pos = _scores("inlier", inlier), _scores("outlier", outlier)
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def fpr_at_tpr(inlier, outlier, tpr: float = 0.95) -> float:
    """Share of inliers flagged at the highest threshold that flags at least ``tpr`` of the
    outliers (flagged: ``score >= threshold``)."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    neg, pos = _scores("inlier", inlier), _scores("outlier", outlier)
    k = max(1, math.ceil(tpr * pos.size - 1e-9))  # outliers that must be flagged
    threshold = np.sort(pos)[::-1][k - 1]
    return float((neg >= threshold).mean())


def curve_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoidal area under ``y(x)`` (x ascending), e.g. normalised accuracy against the
    fraction of filters removed (the RISE deletion metric the paper uses)."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if xa.shape != ya.shape or xa.ndim != 1 or xa.size < 2:
        raise ValueError(f"x and y must be 1-D of equal length >= 2, got {xa.shape}, {ya.shape}")
    if np.any(np.diff(xa) <= 0):
        raise ValueError("x must be strictly increasing")
    return float(np.sum((xa[1:] - xa[:-1]) * (ya[1:] + ya[:-1]) / 2.0))


def per_class_spearman(values, scores, classes, min_count: int = 3) -> dict[int, float]:
    """Spearman correlation of ``values`` with ``scores`` within each class (classes with fewer
    than ``min_count`` items or a constant column are left out)."""
    v, s, c = np.asarray(values), np.asarray(scores), np.asarray(classes)
    if not (v.shape == s.shape == c.shape) or v.ndim != 1:
        raise ValueError(
            f"values, scores and classes must be 1-D of one length, got "
            f"{v.shape}, {s.shape}, {c.shape}"
        )
    out: dict[int, float] = {}
    for k in np.unique(c):
        m = c == k
        if m.sum() < min_count or np.ptp(v[m]) == 0 or np.ptp(s[m]) == 0:
            continue
        out[int(k)] = float(spearmanr(v[m], s[m]).statistic)
    return out
