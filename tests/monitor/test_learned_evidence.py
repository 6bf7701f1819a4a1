"""The learned evidence at inference: its features and decision by hand (numpy), its rank
against the exponential-tail oracle, the gate's score with it, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.monitor import atypicality
from surprise_monitor.monitor.learned_evidence import (
    LEARNED_EVIDENCE,
    LearnedEvidence,
    rank_features,
)
from tests._checks import exponential_tail

NAMES = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a"]
FLOOR = 1.0 / 101


def _evidence(seed: int = 0) -> LearnedEvidence:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(2 * len(NAMES), generator=g)
    reference = torch.sort(torch.randn(300, generator=g) * 2).values
    return LearnedEvidence(weights, 0.3, FLOOR, reference)


def _ranks(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, len(NAMES), generator=g)
    r[0, 0], r[1, 1], r[2, 3] = 1e-6, 1.0, 1e-7  # beyond the floor, at the top; a far input
    return r


def test_the_features_by_hand():
    r = _ranks(20).numpy().astype(np.float64)
    up = np.clip(r, FLOOR, 1.0)
    low = np.clip(1.0 - up + FLOOR, FLOOR, 1.0)
    want = np.concatenate([-np.log(up), -np.log(low)], axis=1)
    got = rank_features(torch.from_numpy(r).float(), FLOOR)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert got.shape == (20, 8) and float(got.max()) <= -np.log(FLOOR) + 1e-5
    assert float(got[0, 0]) == pytest.approx(-np.log(FLOOR), rel=1e-6)  # clipped at the floor


def test_the_decision_and_its_rank_by_hand():
    e, r = _evidence(), _ranks(30)
    x = rank_features(r, FLOOR).double().numpy()
    decision = x @ e.weights.double().numpy() + e.bias
    np.testing.assert_allclose(e.decision(r).numpy(), decision, rtol=1e-5, atol=1e-5)
    want = exponential_tail(e.reference.double().numpy(), decision)
    np.testing.assert_allclose(e.tail_ranks(r).numpy(), want, rtol=1e-4, atol=1e-6)
    assert e.components == len(NAMES)


def test_the_gate_ranks_by_energy_and_the_learned_rank():
    e, r = _evidence(), _ranks(40)
    gate = atypicality.Gate.columns(NAMES, LEARNED_EVIDENCE, 25.0, e)
    assert gate.evidence == (2,) and gate.gate == (3,)
    stat = -2 * np.log(r[:, 3].double().numpy())
    learned = np.log(e.tail_ranks(r).double().numpy())
    shut = -2 * (np.log(r[:, 2].double().numpy()) + e.rank_weight * learned)
    assert e.rank_weight == 0.5  # the default: half a component's weight
    want = np.where(stat >= 25.0, stat + atypicality.GATE_OFFSET, shut)
    np.testing.assert_allclose(gate.score(r).double().numpy(), want, rtol=1e-5)
    assert (stat >= 25.0).any() and (stat < 25.0).any()
    moved = gate.to("cpu")
    assert moved.learned is not None and torch.equal(moved.score(r), gate.score(r))
    assert atypicality.Gate.columns(NAMES, "energy").to("cpu").learned is None


def test_the_gate_refuses_a_learned_variant_without_its_fit_and_a_fit_elsewhere():
    with pytest.raises(ValueError, match="and they alone, need a fitted LearnedEvidence"):
        atypicality.Gate.columns(NAMES, LEARNED_EVIDENCE)
    with pytest.raises(ValueError, match="and they alone, need a fitted LearnedEvidence"):
        atypicality.Gate.columns(NAMES, "energy", learned=_evidence())
    with pytest.raises(ValueError, match="fitted on 4 components, the score has 3"):
        atypicality.Gate.columns(NAMES[1:], LEARNED_EVIDENCE, learned=_evidence())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": torch.ones(7)}, r"must be \[2J\]"),
        ({"weights": torch.ones(2, 4)}, r"must be \[2J\]"),
        ({"reference": torch.tensor([2.0, 1.0, 3.0])}, "sorted ascending"),
        ({"reference": torch.tensor([1.0])}, "at least 2 values"),
        ({"bias": float("nan")}, "must be finite"),
        ({"weights": torch.full((8,), float("inf"))}, "must be finite"),
        ({"floor": 0.0}, r"floor must lie in \(0, 1\)"),
        ({"rank_weight": 0.0}, r"rank weight must lie in \(0, 1\]"),
    ],
)
def test_a_bad_learned_evidence_is_refused(change, message):
    e = _evidence()
    fields = {"weights": e.weights, "bias": e.bias, "floor": e.floor, "reference": e.reference,
              "rank_weight": e.rank_weight}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        LearnedEvidence(**{**fields, **change})


def test_the_alarm_kind_names_the_part_that_ranked_an_input():
    """Gate shut: energy's rank at most the learned one -> class evidence; else the family of
    the component whose feature adds most to the decision (weights by hand); gate open: the
    stage distance, whatever the learned evidence says."""
    names = ["expectation_mass", "stage_energy:a", "head_distance:h", "energy", "stage_distance:a"]
    weights = torch.zeros(10)
    weights[1] = 2.0  # stage_energy:a's upper tail
    weights[2] = 1.0  # head_distance:h's upper tail
    reference = torch.sort(torch.randn(500, generator=torch.Generator().manual_seed(5))).values
    e = LearnedEvidence(weights, -1.0, 1.0 / 301, reference)
    shut = 1.0  # a score below GATE_OFFSET
    # the stage energy far out, energy typical: the learned term (-2 * 0.5 * log r) outweighs
    # energy's (-2 log 0.6) -> low level
    ranks = [0.5, 1e-3, 0.5, 0.6, 0.5]
    assert float(e.tail_ranks(torch.tensor([ranks]))[0]) ** e.rank_weight < 0.6
    assert atypicality.alarm_kind(names, ranks, shut, e) == "low_level"
    assert atypicality.alarm_kind(names, ranks, shut) == "class_evidence"  # no learned part
    # the head distance out further than the stage energy: 1.0 * 5.7 > 2.0 * 0.7 -> features
    ranks = [0.5, 0.5, 1.0 / 301, 0.6, 0.5]
    assert atypicality.alarm_kind(names, ranks, shut, e) == "features"
    # energy more atypical than the learned rank: class evidence
    ranks = [0.5, 0.5, 0.5, 1e-6, 0.5]
    assert float(e.tail_ranks(torch.tensor([ranks]))[0]) ** e.rank_weight > 1e-6
    assert atypicality.alarm_kind(names, ranks, shut, e) == "class_evidence"
    # the gate open: the stage distance names it
    assert atypicality.alarm_kind(names, ranks, atypicality.GATE_OFFSET + 1, e) == "low_level"
    assert atypicality.alarm_kind(names, [float("nan")] * 5, shut, e) == "class_evidence"


def test_the_alarm_kind_of_learned_with_mass_weighs_the_mass_term_too():
    """``learned+mass``: an input the expectation mass ranked (its term beats the learned
    rank's) is class evidence, though the learned term outweighs energy's; ``learned`` (no
    mass in its Fisher sum) names the learned part's family for the same ranks."""
    names = ["expectation_mass", "stage_energy:a", "head_distance:h", "energy", "stage_distance:a"]
    weights = torch.zeros(10)
    weights[1] = 2.0  # stage_energy:a's upper tail
    reference = torch.sort(torch.randn(500, generator=torch.Generator().manual_seed(5))).values
    e = LearnedEvidence(weights, -1.0, 1.0 / 301, reference)
    ranks = [1e-6, 1e-3, 0.5, 0.6, 0.5]  # mass far out, the stage energy out, energy typical
    learned_term = float(e.tail_ranks(torch.tensor([ranks]))[0]) ** e.rank_weight
    assert 1e-6 < learned_term < 0.6  # beats energy's term, not the mass's
    assert atypicality.alarm_kind(names, ranks, 1.0, e, "learned") == "low_level"
    assert atypicality.alarm_kind(names, ranks, 1.0, e, "learned+mass") == "class_evidence"
    assert atypicality.learned_kind(names, ranks, e, ()) == "class_evidence"  # no column
    ranks[0] = 0.5  # the mass typical: the learned part's family again
    assert atypicality.alarm_kind(names, ranks, 1.0, e, "learned+mass") == "low_level"


def test_the_rank_floor_is_that_of_the_smallest_reference():
    reference = atypicality.ScoreReference((torch.arange(9.0), torch.arange(4.0)))
    assert reference.rank_floor == pytest.approx(1.0 / 5)  # 4 values: the smallest step rank
    assert float(atypicality.tail_ranks(torch.arange(4.0), torch.tensor([9.0]))) == pytest.approx(
        reference.rank_floor
    )


def test_learned_with_knn_adds_the_nearest_neighbour_rank_to_energy_s():
    """``learned+knn``: Fisher's sum of energy's and the KNN distance's ranks plus half the
    learned rank's term (numpy by hand); refused without the KNN column; an input whose KNN
    rank outweighs every other term is ``features`` (the head layer's)."""
    names = [*NAMES, "knn_distance:h"]
    g = torch.Generator().manual_seed(3)
    e = LearnedEvidence(torch.randn(2 * len(names), generator=g), 0.3, FLOOR,
                        torch.sort(torch.randn(300, generator=g)).values)  # fmt: skip
    r = torch.rand(30, len(names), generator=g) * 0.98 + 0.01
    gate = atypicality.Gate.columns(names, "learned+knn", float("inf"), e)
    assert gate.evidence == (2, 4)
    learned = np.log(e.tail_ranks(r).double().numpy())
    want = -2 * (np.log(r[:, 2].double().numpy()) + np.log(r[:, 4].double().numpy())
                 + 0.5 * learned)  # fmt: skip
    np.testing.assert_allclose(gate.score(r).double().numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="knn_distance"):
        atypicality.Gate.columns(NAMES, "learned+knn", 1.0, _evidence())
    ranks = [0.5, 0.5, 0.5, 0.5, 1e-9]  # the KNN distance far out, nothing else
    assert float(e.tail_ranks(torch.tensor([ranks]))[0]) ** e.rank_weight > 1e-9
    assert atypicality.alarm_kind(names, ranks, 1.0, e, "learned+knn") == "features"
    assert atypicality.alarm_kind(names, ranks, 1.0, e, "learned") != "features"
