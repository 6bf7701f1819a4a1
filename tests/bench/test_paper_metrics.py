"""bench.paper.metrics against scikit-learn, SciPy and pytorch-ood."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score, roc_curve

from bench.paper.metrics import auroc, curve_auc, fpr_at_tpr, per_class_spearman


def _sets(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    neg, pos = rng.normal(0, 1, 300), rng.normal(0.8, 1.3, 170)
    if ties:  # many exact ties within and across the two sets
        neg, pos = np.round(neg, 1), np.round(pos, 1)
    return neg, pos


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_sklearn(seed, ties):
    neg, pos = _sets(seed, ties)
    want = roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], np.r_[neg, pos])
    assert auroc(neg, pos) == pytest.approx(want, abs=1e-12)
    assert auroc(pos, neg) == pytest.approx(1 - want, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tpr", [0.95, 0.8, 1.0])
def test_fpr_at_tpr_matches_sklearn_roc_curve(ties, tpr):
    neg, pos = _sets(3, ties)
    fpr, tprs, _ = roc_curve(
        np.r_[np.zeros(neg.size), np.ones(pos.size)], np.r_[neg, pos], drop_intermediate=False
    )
    want = fpr[np.argmax(tprs >= tpr)]  # first threshold reaching the TPR
    assert fpr_at_tpr(neg, pos, tpr) == pytest.approx(want, abs=1e-12)


def test_fpr95_matches_pytorch_ood():
    from pytorch_ood.metrics import OODMetrics

    neg, pos = _sets(4, False)
    m = OODMetrics()
    scores = torch.tensor(np.r_[neg, pos], dtype=torch.float32)
    labels = torch.tensor([0] * neg.size + [-1] * pos.size)  # pytorch-ood: OOD labels < 0
    m.update(scores, labels)
    got = m.compute()
    assert fpr_at_tpr(neg, pos) == pytest.approx(got["FPR95TPR"], abs=1e-6)
    assert auroc(neg, pos) == pytest.approx(got["AUROC"], abs=1e-6)


def test_perfect_and_reversed_separation():
    assert auroc([0, 1, 2], [3, 4]) == 1.0 and fpr_at_tpr([0, 1, 2], [3, 4]) == 0.0
    assert auroc([3, 4], [0, 1, 2]) == 0.0 and fpr_at_tpr([3, 4], [0, 1, 2]) == 1.0


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        fpr_at_tpr([0.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([0.0], [1.0], tpr=0.0)


def test_curve_auc_is_the_trapezoid_rule():
    x = np.linspace(0, 1, 33)
    y = np.exp(-5 * x)
    assert curve_auc(x, y) == pytest.approx(np.trapezoid(y, x), abs=1e-12)
    assert curve_auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)  # by hand
    with pytest.raises(ValueError, match="increasing"):
        curve_auc([0, 0, 1], [1, 1, 1])


def test_per_class_spearman_matches_scipy_per_class():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 4, 400)
    c[:2] = 9  # a class with two items: left out
    v = rng.normal(size=400)
    s = v * (c + 1) + rng.normal(size=400)
    got = per_class_spearman(v, s, c)
    assert sorted(got) == [0, 1, 2, 3]
    for k, r in got.items():
        m = c == k
        assert r == pytest.approx(spearmanr(v[m], s[m]).statistic, abs=1e-12)
