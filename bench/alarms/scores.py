"""Candidate atypicality scores, the post-hoc baselines, detection metrics and alarm rates.

Convention (pytorch-ood's): atypical inputs are the positive class and a higher score means
more atypical. The baselines are pytorch-ood's detectors on the same model: ``MaxSoftmax``
(MSP), ``MaxLogit``, ``EnergyBased`` from the logits, ``Mahalanobis`` (class means and a shared
covariance) and ``KNN`` (k = 50, normalised features) fitted on the 50,000 training images'
penultimate features.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import binomtest

from bench.paper.metrics import auroc, fpr_at_tpr

#: The monitor's candidates (name -> function of a judged set), the default first.
CANDIDATES: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "default (Fisher)": lambda j: j["score"],
    "without the head (v1)": lambda j: j["score_without_head"],
    "head distance alone": lambda j: j["components"][:, -1],
    "sum of components": lambda j: j["components"].sum(1),
    "final layer: expectation mass": lambda j: j["components"][:, 0],
    "final layer: mean z^2": lambda j: j["final_z2"],
    "-beta": lambda j: -j["beta"],
    "-beta percentile": lambda j: -j["beta_percentile"],
    "surprising filters": lambda j: j["surprise_count"].astype(np.float64),
}
BASELINES = ("MSP", "MaxLogit", "Energy", "Mahalanobis", "KNN")


class Baselines:
    """pytorch-ood's detectors for one model, fitted on its training features."""

    def __init__(self, train_features: np.ndarray, train_labels: np.ndarray, k: int = 50) -> None:
        from pytorch_ood.detector import KNN, Mahalanobis

        z = torch.from_numpy(train_features).float()
        y = torch.from_numpy(train_labels).long()
        self.mahalanobis = Mahalanobis(None).fit_features(z, y)
        self.knn = KNN(None, k=k).fit_features(z, y)

    def scores(self, judged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every baseline's score of a judged set (higher = more atypical)."""
        from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

        logits = torch.from_numpy(judged["logits"]).float()
        feats = torch.from_numpy(judged["features"]).float()
        return {
            "MSP": MaxSoftmax.score(logits).numpy(),
            "MaxLogit": MaxLogit.score(logits).numpy(),
            "Energy": EnergyBased.score(logits).numpy(),
            "Mahalanobis": self.mahalanobis.predict_features(feats).numpy(),
            "KNN": np.asarray(self.knn.predict_features(feats), np.float64),
        }


def all_scores(judged: dict[str, np.ndarray], baselines: Baselines) -> dict[str, np.ndarray]:
    """The candidates' and the baselines' scores of a judged set."""
    out = {name: np.asarray(fn(judged), np.float64) for name, fn in CANDIDATES.items()}
    out.update(baselines.scores(judged))
    return out


def detection(inlier: dict[str, np.ndarray], outlier: dict[str, np.ndarray]) -> dict[str, dict]:
    """score -> {"auroc", "fpr95"} for telling ``outlier`` from ``inlier``."""
    return {
        name: {
            "auroc": auroc(inlier[name], outlier[name]),
            "fpr95": fpr_at_tpr(inlier[name], outlier[name], 0.95),
        }
        for name in inlier
    }


def alarm_rate(p_values: np.ndarray, rate: float) -> dict[str, float]:
    """Share of ``p_values <= rate`` (the alarms at that nominal rate) with its exact
    (Clopper-Pearson) 95% interval."""
    p = np.asarray(p_values, np.float64)
    if p.size == 0 or not np.isfinite(p).all():
        raise ValueError("alarm_rate needs finite p-values")
    k = int((p <= rate).sum())
    ci = binomtest(k, p.size).proportion_ci(confidence_level=0.95, method="exact")
    return {"nominal": rate, "alarms": k, "inputs": int(p.size), "rate": k / p.size,
            "ci_low": float(ci.low), "ci_high": float(ci.high)}  # fmt: skip


def margin(results: dict[str, dict], score: str, metric: str = "auroc") -> tuple[float, str]:
    """How far ``score`` is ahead of the best baseline on a set (negative: behind), and that
    baseline's name."""
    best = max(BASELINES, key=lambda b: results[b][metric])
    return results[score][metric] - results[best][metric], best
