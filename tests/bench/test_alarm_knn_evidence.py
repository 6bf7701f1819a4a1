"""bench.alarms.knn_evidence: the KNN component against pytorch-ood's KNN, the gated scores and
the rules' picks by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.alarms import knn_evidence as ke
from surprise_monitor.monitor.atypicality import GATE_OFFSET, Gate
from surprise_monitor.monitor.tails import exponential_tail_ranks


def test_the_distance_is_pytorch_ood_s_knn_score_on_the_bank():
    pytest.importorskip("sklearn")
    from pytorch_ood.detector import KNN

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 16, generator=g) + 0.5
    knn = ke.KnnRank.fit(feats, size=150, k=7)
    oracle = KNN(None, k=7).fit_features(feats[:150], torch.zeros(150, dtype=torch.long))
    x = torch.randn(60, 16, generator=g) * 2.0
    expected = np.asarray(oracle.predict_features(x), np.float64)
    np.testing.assert_allclose(knn.distances(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    # the reference: the next 150 images' distances, sorted; ranks read with the library's tail
    ref = np.sort(np.asarray(oracle.predict_features(feats[150:300]), np.float64))
    np.testing.assert_allclose(knn.reference.numpy(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        knn.ranks(x), exponential_tail_ranks(knn.reference, knn.distances(x))
    )
    with pytest.raises(ValueError, match="2 x 300"):
        ke.KnnRank.fit(feats, size=300)


def test_the_gated_scores_add_the_weighted_knn_term_behind_the_gate():
    names = ["expectation_mass", "energy", "stage_distance:a", "stage_distance:h"]
    gates = {v: Gate.columns(names, v, threshold=6.0) for v in ("energy", "energy+mass")}
    ranks = torch.tensor([[0.5, 0.2, 0.5, 0.5], [0.5, 0.2, 1e-3, 1e-3], [0.01, 0.9, 0.4, 0.6]])
    knn = torch.tensor([0.05, 0.5, 0.3])
    out = ke.gated_scores(gates, ranks, knn)
    assert set(out) == set(ke.LABELS)
    fisher = lambda *r: -2.0 * sum(math.log(v) for v in r)  # noqa: E731
    gate_stat = fisher(1e-3, 1e-3)
    assert gate_stat > 6.0 > fisher(0.5, 0.5)  # the second input opens the gate
    for w in ke.WEIGHTS:
        e = out[ke.label("energy+knn", w)].tolist()
        assert e[0] == pytest.approx(fisher(0.2) + w * fisher(0.05))
        assert e[1] == pytest.approx(gate_stat + GATE_OFFSET)
        m = out[ke.label("energy+mass+knn", w)].tolist()
        assert m[2] == pytest.approx(fisher(0.01, 0.9) + w * fisher(0.3))


def test_each_rule_picks_by_hand():
    margins = {
        "safe": {"a": 0.001, "b": 0.000, "c": -0.001},  # the best worst margin
        "bold": {"a": 0.060, "b": 0.050, "c": -0.025},  # within 0.03: the best mean
        "many": {"a": 0.010, "b": 0.010, "c": 0.010},  # wins all three, a smaller mean
        "wild": {"a": 0.300, "b": 0.300, "c": -0.040},  # beyond the tolerance
    }
    picks = {rule: ke.pick(margins, rule) for rule in ke.RULES}
    assert picks == {"worst": "many", "tolerance, then mean": "bold",
                     "tolerance, then wins": "many"}  # fmt: skip
    del margins["many"]
    assert ke.pick(margins, "worst") == "safe"
    assert ke.pick(margins, "tolerance, then wins") == "bold"  # 2 wins each: the mean
    tied = {"first": {"a": 0.01}, "second": {"a": 0.01}}
    assert {ke.pick(tied, rule) for rule in ke.RULES} == {"first"}


def test_the_checks_are_loo_s():
    base = {"MSP": 0.7, "MaxLogit": 0.75, "Energy": 0.78, "KNN": 0.6}
    aurocs = {
        "a": {**base, "x": 0.80},  # beats every baseline
        "b": {**base, "x": 0.74},  # 0.04 behind Energy: missed
        "mnist": {**base, "x": 0.96},
    }
    family_of = {"a": "geometry", "b": "occlusion", "mnist": "far"}
    c = ke.checks(aurocs, family_of, "x", "m")
    assert (c["beats"], c["beats_of"]) == (2, 3) and c["passed"] is False
    assert c["slack"] == pytest.approx(0.74 - 0.78 + 0.03)
    assert c["mnist_min"] == pytest.approx(0.96)
