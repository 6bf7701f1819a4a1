"""The atypicality score's pieces against numpy / scipy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtri

from surprise_monitor.monitor import atypicality
from surprise_monitor.monitor.atypicality import (
    ALARM_KINDS,
    EXPONENTIAL_TAIL,
    GATE_OFFSET,
    GATED_SCORE_NAME,
    ScoreReference,
    alarm_kind,
    component_family,
    component_names,
    components,
    evidence_kind,
    expectation_mass,
    head_distance,
    normal_scores,
    stage_energy,
    tail_ranks,
)
from tests._checks import exponential_tail


def oracle_z(pct: np.ndarray) -> np.ndarray:
    return ndtri(np.clip(pct, 0.05, 99.95) / 100.0)


def test_normal_scores_clip_the_tails_and_match_scipy():
    pct = torch.tensor([0.0, 0.01, 0.05, 2.5, 50.0, 97.5, 99.99, 100.0])
    np.testing.assert_allclose(normal_scores(pct).numpy(), oracle_z(pct.numpy()), atol=1e-5)
    assert normal_scores(torch.tensor([100.0])).item() == pytest.approx(3.2905, abs=1e-3)


def test_components_are_the_lower_tail_mass_and_the_two_sided_energy():
    g = np.random.default_rng(0)
    alpha_pct = g.uniform(0, 100, size=(5, 40)).astype(np.float32)
    stage = [g.uniform(0, 100, size=(5, c)).astype(np.float32) for c in (7, 3)]
    z = oracle_z(alpha_pct)
    want_mass = (np.clip(-z, 0, None) ** 2).mean(1)
    want_energy = [(oracle_z(s) ** 2).mean(1) for s in stage]
    got = components(torch.from_numpy(alpha_pct), [torch.from_numpy(s) for s in stage]).numpy()
    np.testing.assert_allclose(got[:, 0], want_mass, rtol=1e-5)
    np.testing.assert_allclose(got[:, 1], want_energy[0], rtol=1e-5)
    np.testing.assert_allclose(got[:, 2], want_energy[1], rtol=1e-5)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(expectation_mass(torch.from_numpy(alpha_pct)), want_mass, 1e-5)
    np.testing.assert_allclose(stage_energy(torch.from_numpy(stage[0])), want_energy[0], 1e-5)
    assert component_names(["a", "b"]) == ["expectation_mass", "stage_energy:a",
                                           "stage_energy:b"]  # fmt: skip


def test_the_head_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    """Against an explicit float64 loop over classes, with features far from the origin (the
    float32 expansion must not lose them to cancellation)."""
    g = np.random.default_rng(2)
    c, k = 12, 4
    a = g.normal(size=(c, c))
    precision = a @ a.T / c + np.eye(c)
    means = g.normal(size=(k, c)) + 50.0
    feats = means[g.integers(0, k, size=30)] + g.normal(size=(30, c))
    want = np.min([[(f - m) @ precision @ (f - m) for m in means] for f in feats], axis=1)
    got = head_distance(*(torch.from_numpy(v).float() for v in (feats, means, precision)))
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=2e-3)
    parts = components(torch.full((30, 5), 50.0), [], got)
    assert parts.shape == (30, 2) and torch.equal(parts[:, 1], got)
    assert component_names(["a"], "h") == ["expectation_mass", "stage_energy:a",
                                           "head_distance:h"]  # fmt: skip


def test_above_the_median_the_expectation_mass_is_zero():
    assert expectation_mass(torch.full((2, 4), 50.0)).tolist() == [0.0, 0.0]
    assert expectation_mass(torch.full((1, 4), 99.0)).item() == 0.0
    assert expectation_mass(torch.full((1, 4), 1.0)).item() > 5.0


def test_the_score_is_fishers_combination_of_tail_ranks():
    g = np.random.default_rng(1)
    ref = g.normal(size=(300, 3)).astype(np.float32)
    q = g.normal(size=(20, 3)).astype(np.float32)
    reference = ScoreReference.of(torch.from_numpy(ref))
    tails = np.stack(
        [[(1 + np.sum(ref[:, j] >= q[i, j])) / 301 for j in range(3)] for i in range(20)]
    )
    np.testing.assert_allclose(
        tail_ranks(reference.sorted_components[1], torch.from_numpy(q[:, 1])).numpy(),
        tails[:, 1], rtol=1e-6,
    )  # fmt: skip
    want = -2 * np.log(tails).sum(1)
    np.testing.assert_allclose(reference.score(torch.from_numpy(q)).numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="2 components for a reference of 3"):
        reference.score(torch.zeros(4, 2))


def test_exponential_tail_ranks_against_numpy():
    """Interpolated between the reference values, an exponential tail above the 50th highest:
    numpy's oracle everywhere, the step ranks at the reference values below it, and no ties
    among values beyond every training value (where the step ranks all read ``1 / (m + 1)``)."""
    g = np.random.default_rng(4)
    ref = np.sort(g.gamma(2.0, size=2000)).astype(np.float32)
    values = np.concatenate([g.gamma(2.0, size=300), ref.max() + g.uniform(0, 5, size=50),
                             [-1.0, 0.0, 1e4]]).astype(np.float32)  # fmt: skip
    got = atypicality.exponential_tail_ranks(torch.from_numpy(ref), torch.from_numpy(values))
    np.testing.assert_allclose(got.numpy(), exponential_tail(ref, values), rtol=2e-5)
    body = torch.from_numpy(ref[:1900:37])  # reference values below the tail's threshold
    torch.testing.assert_close(
        atypicality.exponential_tail_ranks(torch.from_numpy(ref), body),
        tail_ranks(torch.from_numpy(ref), body), rtol=1e-5, atol=1e-7,
    )  # fmt: skip
    beyond = got.numpy()[300:350]
    order = np.argsort(values[300:350])
    assert (np.diff(beyond[order]) < 0).all()  # strictly decreasing, no ties
    assert beyond.max() < 51 / 2001 and got[-3] == 1.0 and 0 < got[-1] < 1e-30
    # a reference of one value: the step ranks
    one = atypicality.exponential_tail_ranks(torch.tensor([1.0]), torch.tensor([0.0, 2.0]))
    assert one.tolist() == [1.0, 0.5]


def test_the_reference_reads_its_tail():
    g = np.random.default_rng(5)
    rows = torch.from_numpy(g.normal(size=(500, 2)).astype(np.float32))
    q = torch.tensor([[9.0, 0.0], [8.0, 0.1]])
    step, smooth = ScoreReference.of(rows), ScoreReference.of(rows, EXPONENTIAL_TAIL)
    assert step.tail == "step" and smooth.to("cpu").tail == EXPONENTIAL_TAIL
    assert step.ranks(q)[0, 0] == step.ranks(q)[1, 0] == 1 / 501  # tied beyond the reference
    assert smooth.ranks(q)[0, 0] < smooth.ranks(q)[1, 0] < 1 / 501
    with pytest.raises(ValueError, match="tail must be one of"):
        ScoreReference(step.sorted_components, "gaussian")


def test_a_bad_reference_is_refused():
    with pytest.raises(ValueError, match="sorted ascending"):
        ScoreReference((torch.tensor([2.0, 1.0]),))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ScoreReference((torch.zeros(0),))


def test_the_alarm_kind_is_the_family_with_the_smallest_adjusted_rank():
    names = ["expectation_mass", "stage_energy:layer1", "stage_energy:layer2", "head_distance:l4"]
    assert component_family("stage_energy:layer2") == "low_level"
    assert component_family("head_distance:x") == "features" and component_family("z") == "other"
    assert alarm_kind(names, [0.5, 0.001, 0.9, 0.5]) == "low_level"  # 0.002 after Bonferroni
    assert alarm_kind(names, [0.0015, 0.001, 0.9, 0.5]) == "class_evidence"  # 0.0015 < 0.002
    assert alarm_kind(names, [0.3, 0.2, 0.2, 0.01]) == "features"
    assert alarm_kind(names, [float("nan"), float("nan"), 0.5, float("nan")]) == "low_level"
    assert alarm_kind(names, [float("nan")] * 4) is None
    assert alarm_kind(names, [0.01, 0.005, 0.9, 0.5]) == "class_evidence"  # a tie: listed first
    assert set(ALARM_KINDS) == {"class_evidence", "low_level", "features"}


def test_the_gated_scores_kind_is_the_part_that_ranked_the_input():
    """Gate open: the furthest stage distance (the head layer's means features); gate shut:
    the class evidence, whatever the other components' ranks."""
    names = component_names(["layer1"], "layer4", GATED_SCORE_NAME)
    assert names[-3:] == ["energy", "stage_distance:layer1", "stage_distance:layer4"]
    ranks = {n: 0.5 for n in names}

    def kind(score: float, **given: float) -> str | None:
        row = {**ranks, **{k.replace("__", ":"): v for k, v in given.items()}}
        return alarm_kind(names, [row[n] for n in names], score)

    opened = GATE_OFFSET + 12.0
    assert kind(opened, stage_distance__layer1=0.001, stage_distance__layer4=0.01) == "low_level"
    assert kind(opened, stage_distance__layer1=0.01, stage_distance__layer4=0.001) == "features"
    # shut: the class evidence ranked it, even where a Fisher component's rank is smallest
    assert kind(9.0, stage_energy__layer1=1e-4, head_distance__layer4=1e-4) == "class_evidence"
    # without the score (or NaN) the Fisher rule over the families
    fisher_rule = {**ranks, "expectation_mass": 0.01}
    assert alarm_kind(names, [fisher_rule[n] for n in names]) == "class_evidence"
    assert kind(float("nan"), stage_energy__layer1=1e-4) == "low_level"


def test_the_report_carries_the_alarm_kind_of_alarmed_inputs_only():
    from surprise_monitor.monitor.report import MonitorReport

    def report(alarm: bool) -> MonitorReport:
        z = torch.zeros(1, 2)
        return MonitorReport(
            logits=z, classes=torch.tensor([0]), labels_given=False, alpha=z, mu=z,
            percentile=z, surprise=z.bool(), expectation=z.bool(), beta=torch.zeros(1),
            beta_percentile=torch.zeros(1), low_beta=torch.zeros(1, dtype=bool),
            calibrated=torch.ones(1, dtype=bool), score=torch.ones(1),
            p_value=torch.full((1,), 0.001), alarm=torch.tensor([alarm]),
            components=torch.ones(1, 3), component_ranks=torch.tensor([[0.4, 0.3, 0.02]]),
            layer="l", class_names=("a", "b"),
            component_names=("expectation_mass", "stage_energy:s1", "head_distance:h"),
        )  # fmt: skip

    assert report(True).sample(0)["alarm_kind"] == "features"
    assert report(False).sample(0)["alarm_kind"] is None
    assert report(False).alarm_kind(0) == "features"


def test_energy_is_minus_logsumexp():
    from scipy.special import logsumexp

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3)) * 4
    want = -logsumexp(logits.double().numpy(), axis=1)
    np.testing.assert_allclose(atypicality.energy(logits).numpy(), want, rtol=1e-6)


def test_the_stage_distance_is_the_class_agnostic_mahalanobis_of_fit_stage():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(300, 5, generator=g) @ torch.randn(5, 5, generator=g)
    mean, precision = atypicality.fit_stage(f, shrink=0.2)
    x = f.double().numpy()
    cov = np.cov(x, rowvar=False)
    cov = 0.8 * cov + 0.2 * np.trace(cov) / 5 * np.eye(5)
    np.testing.assert_allclose(precision.numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    y = torch.randn(4, 5, generator=g) * 3
    d = y.double().numpy() - x.mean(0)
    want = np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
    got = atypicality.StageDistance.of([mean, mean], [precision, precision])([y, y])
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got[:, 1].numpy(), want, rtol=1e-4)
    with pytest.raises(ValueError, match="channel means"):
        atypicality.fit_stage(f[:1])


def test_the_gate_ranks_far_inputs_first_and_the_rest_by_the_evidence():
    names = ["expectation_mass", "stage_energy:a", "energy", "stage_distance:a",
             "stage_distance:b"]  # fmt: skip
    gate = atypicality.Gate.columns(names, "energy")
    assert gate.gate == (3, 4) and gate.evidence == (2,) and gate.threshold == float("inf")
    assert atypicality.Gate.columns(names, "energy+mass").evidence == (0, 2)
    ranks = torch.tensor([[0.5, 0.5, 0.01, 0.5, 0.5], [0.5, 0.5, 0.5, 0.001, 0.002],
                          [0.5, 0.5, 0.2, 0.3, 0.4]])  # fmt: skip
    reference = torch.rand(200, 5, generator=torch.Generator().manual_seed(5)) * 0.98 + 0.02
    at = gate.at_level(reference, 0.05)
    stat = -2 * torch.log(reference[:, 3:]).sum(1).double()
    assert at.threshold == pytest.approx(float(torch.quantile(stat, 0.95)))
    got = at.score(ranks)
    far = -2 * math.log(0.001) - 2 * math.log(0.002)
    assert got[1].item() == pytest.approx(atypicality.GATE_OFFSET + far, rel=1e-6)
    assert got[0].item() == pytest.approx(-2 * math.log(0.01), rel=1e-6)
    assert got[2].item() == pytest.approx(-2 * math.log(0.2), rel=1e-6)
    with pytest.raises(ValueError, match="evidence variant"):
        atypicality.Gate.columns(names, "beta")
    with pytest.raises(ValueError, match="lack the gated score"):
        atypicality.Gate.columns(names[:3], "energy")
    with pytest.raises(ValueError, match="gate level"):
        gate.at_level(reference, 0.0)


def test_the_knn_variants_kind_is_the_evidence_column_that_ranked_the_input():
    """Gate shut, ``+knn`` variant: the nearest-neighbour distance's rank smallest among the
    evidence columns -> features; energy's or the mass's -> class evidence; a tie -> the
    first listed (energy); a NaN among them -> class evidence; the variants without the
    component are unchanged."""
    names = component_names(["layer1"], "layer4", GATED_SCORE_NAME, knn=True)
    assert names[-2:] == ["stage_distance:layer4", "knn_distance:layer4"]
    assert (
        component_names(["layer1"], "", GATED_SCORE_NAME, knn=True)[-1] == "stage_distance:layer1"
    )
    base = {n: 0.5 for n in names}

    def kind(evidence: str, **given: float) -> str | None:
        row = {**base, **{k.replace("__", ":"): v for k, v in given.items()}}
        return alarm_kind(names, [row[n] for n in names], 9.0, None, evidence)

    assert kind("energy+knn", knn_distance__layer4=1e-3, energy=0.2) == "features"
    assert kind("energy+knn", knn_distance__layer4=0.2, energy=1e-3) == "class_evidence"
    assert kind("energy+mass+knn", knn_distance__layer4=1e-3, expectation_mass=1e-4) == (
        "class_evidence"
    )
    assert kind("energy+knn", knn_distance__layer4=0.2, energy=0.2) == "class_evidence"
    assert kind("energy+knn", knn_distance__layer4=float("nan")) == "class_evidence"
    assert kind("energy", knn_distance__layer4=1e-6) == "class_evidence"  # not in its evidence
    assert evidence_kind(names, [base[n] for n in names], ()) == "class_evidence"
