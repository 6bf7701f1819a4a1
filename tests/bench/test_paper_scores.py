"""The atypicality scores of bench.paper.scores, by hand and against SciPy / pytorch-ood."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest, norm

from bench.paper.scores import (
    BASELINE_SCORES,
    MONITOR_SCORES,
    Baselines,
    monitor_scores,
    percentile_ks,
    percentile_z2,
)


def test_percentile_z2_by_hand():
    p = torch.tensor([[50.0, 50.0], [97.5, 2.5], [100.0, 0.0]])
    got = percentile_z2(p)
    assert got[0] == pytest.approx(0.0, abs=1e-12)
    assert got[1] == pytest.approx(norm.ppf(0.975) ** 2, rel=1e-9)
    assert got[2] == pytest.approx(norm.ppf(0.9995) ** 2, rel=1e-9)  # clipped at 0.05%


def test_percentile_ks_matches_scipy():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 64, generator=g, dtype=torch.float64) * 100
    p[1] = p[1] * 0.3  # shifted low
    got = percentile_ks(p)
    for i in range(5):
        assert got[i] == pytest.approx(kstest(p[i].numpy() / 100, "uniform").statistic, abs=1e-12)
    assert got[1] > got[0]


def test_monitor_scores_signs():
    rep = {
        "beta": torch.tensor([1.0, -2.0]),
        "beta_percentile": torch.tensor([60.0, 0.5]),
        "surprise": torch.tensor([[False, False, True], [True, True, False]]),
        "expectation": torch.tensor([[False, False, False], [False, False, True]]),
        "percentile": torch.tensor([[40.0, 55.0, 99.95], [99.99, 100.0, 0.0]]),
    }
    s = monitor_scores(rep)
    assert list(s) == list(MONITOR_SCORES)
    assert s["low beta"].tolist() == [-1.0, 2.0]
    assert s["low beta percentile"].tolist() == [-60.0, -0.5]
    assert s["surprise count"].tolist() == [1.0, 2.0]
    assert s["expectation count"].tolist() == [0.0, 1.0]
    for k in ("percentile z2", "percentile KS"):
        assert s[k][1] > s[k][0], k


def test_baselines_by_hand():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(100)
    centres = torch.tensor([[3.0] * 6, [3.0, -3.0] * 3])
    feats = centres[labels] + 0.3 * torch.randn(200, 6, generator=g)
    base = Baselines(feats, labels, k=5)
    logits = torch.randn(4, 3, generator=g)
    probe = torch.stack([centres[1] + 0.1, torch.full((6,), -3.0)])  # typical, atypical
    s = base.scores(logits[:2], probe)
    assert list(s) == list(BASELINE_SCORES)
    soft = torch.softmax(logits[:2].double(), 1)
    assert np.allclose(s["max softmax"], -soft.max(1).values.numpy(), atol=1e-6)
    assert np.allclose(s["max logit"], -logits[:2].max(1).values.double().numpy(), atol=1e-6)
    assert np.allclose(s["energy"], -torch.logsumexp(logits[:2].double(), 1).numpy(), atol=1e-5)
    assert s["Mahalanobis"][1] > s["Mahalanobis"][0]  # far from both class centres
    assert s["KNN"][1] > s["KNN"][0]
