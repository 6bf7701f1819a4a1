"""Atypicality scores (higher = more atypical) from a monitor report and from the usual baselines.

From the monitor (the input judged against its predicted class):

- ``low beta``: ``-beta``;  ``low beta percentile``: ``-beta_percentile`` (beta's rank among
  the class's calibration betas, so classes with different beta scales are comparable);
- ``surprise count`` / ``expectation count``: flagged filters (``alpha > P_cn(99.9)``, and
  ``alpha < P_cn(0.1)`` with ``mu_cn`` above the class average);
- ``percentile z2`` (designed here): the table holds each filter's whole distribution for the
  class, so each filter's percentile rank ``p_n`` is, for a typical input, roughly uniform.
  ``mean_n Phi^-1(p_n)^2`` (``p`` clipped to [0.05%, 99.95%]) grows with how far into either
  tail the filters sit, all filters counted, not only those past a fixed threshold;
- ``percentile KS`` (designed here): the Kolmogorov-Smirnov distance between the input's N
  percentile ranks and the uniform distribution: large when the filters are jointly shifted
  (all somewhat low, all somewhat high) even if none is extreme.

Baselines on the same model: maximum softmax probability, maximum logit, energy (pytorch-ood's
score functions), and pytorch-ood's Mahalanobis and KNN (k = 50, normalised) detectors on the
penultimate features, fitted on the calibration images.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import ndtri

MONITOR_SCORES = (
    "low beta",
    "low beta percentile",
    "surprise count",
    "expectation count",
    "percentile z2",
    "percentile KS",
)
BASELINE_SCORES = ("max softmax", "max logit", "energy", "Mahalanobis", "KNN")


def percentile_z2(percentile: torch.Tensor, clip: float = 0.05) -> np.ndarray:
    """``mean_n probit(p_n)^2`` of ``[B, N]`` percentile ranks in [0, 100]."""
    p = np.clip(percentile.double().numpy(), clip, 100.0 - clip) / 100.0
    return (ndtri(p) ** 2).mean(axis=1)


def percentile_ks(percentile: torch.Tensor) -> np.ndarray:
    """One-sample KS distance of each row's percentile ranks (in [0, 100]) to Uniform(0, 100)."""
    u = np.sort(percentile.double().numpy() / 100.0, axis=1)
    n = u.shape[1]
    i = np.arange(1, n + 1) / n
    return np.maximum((i - u).max(axis=1), (u - (i - 1.0 / n)).max(axis=1))


def monitor_scores(rep: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The monitor-based scores of a concatenated report (see ``common.inspect_all``)."""
    return {
        "low beta": -rep["beta"].double().numpy(),
        "low beta percentile": -rep["beta_percentile"].double().numpy(),
        "surprise count": rep["surprise"].sum(1).double().numpy(),
        "expectation count": rep["expectation"].sum(1).double().numpy(),
        "percentile z2": percentile_z2(rep["percentile"]),
        "percentile KS": percentile_ks(rep["percentile"]),
    }


class Baselines:
    """The baseline detectors, fitted on the calibration images' penultimate features."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, k: int = 50) -> None:
        from pytorch_ood.detector import KNN, Mahalanobis

        self.mahalanobis = Mahalanobis(None).fit_features(features.float(), labels)
        self.knn = KNN(None, k=k).fit_features(features.float(), labels)

    def scores(self, logits: torch.Tensor, features: torch.Tensor) -> dict[str, np.ndarray]:
        from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

        logits = logits.float()
        return {
            "max softmax": MaxSoftmax.score(logits).double().numpy(),
            "max logit": MaxLogit.score(logits).double().numpy(),
            "energy": EnergyBased.score(logits).double().numpy(),
            "Mahalanobis": self.mahalanobis.predict_features(features.float()).double().numpy(),
            "KNN": self.knn.predict_features(features.float()).double().numpy(),
        }
