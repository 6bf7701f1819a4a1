"""bench.alarms.combine: tail probabilities against counting by hand, the combiners against
their closed forms (Fisher against the library's, Cauchy's p-value uniform under the null),
the non-dilution of a strong component, the logit components against pytorch-ood, and the
candidates on a synthetic judged set (the default reproduces the library's score)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from bench.alarms import combine
from surprise_monitor.monitor import atypicality

NAMES = ["expectation_mass", "stage_energy:s1", "stage_energy:s2", "head_distance:h"]


def _rng(seed: int = 0) -> np.random.Generator:
    """A fresh generator."""
    return np.random.default_rng(seed)


def test_tails_against_counting_by_hand():
    rng = _rng()
    ref = rng.integers(0, 20, 300).astype(np.float64)  # ties on purpose
    values = np.r_[rng.integers(-2, 23, 200).astype(np.float64), ref[:5]]
    m = ref.size
    up = np.array([(1 + (ref >= v).sum()) / (m + 1) for v in values])
    low = np.array([(1 + (ref <= v).sum()) / (m + 1) for v in values])
    np.testing.assert_allclose(combine.upper_tail(rng.permutation(ref), values), up)
    np.testing.assert_allclose(combine.lower_tail(rng.permutation(ref), values), low)
    np.testing.assert_allclose(
        combine.two_sided(ref, values), np.minimum(1.0, 2.0 * np.minimum(up, low))
    )
    # beyond the reference: the smallest p-value 1 / (m + 1)
    assert combine.upper_tail(ref, np.array([99.0]))[0] == pytest.approx(1 / (m + 1))
    assert combine.lower_tail(ref, np.array([-99.0]))[0] == pytest.approx(1 / (m + 1))


def test_upper_tail_is_the_library_tail_rank():
    rng = _rng(1)
    ref = rng.normal(size=500).astype(np.float32)
    values = rng.normal(size=100).astype(np.float32)
    want = atypicality.tail_ranks(
        torch.sort(torch.from_numpy(ref)).values, torch.from_numpy(values)
    )
    np.testing.assert_allclose(combine.upper_tail(ref, values), want.numpy(), rtol=1e-6)


def test_two_sided_is_symmetric():
    x = _rng(2).normal(size=400)
    ref = np.r_[x, -x]
    v = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(combine.two_sided(ref, v), combine.two_sided(ref, -v))
    assert combine.two_sided(ref, np.array([0.0]))[0] == 1.0


def test_tails_refuse_bad_input():
    with pytest.raises(ValueError, match="empty"):
        combine.upper_tail(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        combine.lower_tail(np.array([1.0]), np.array([np.nan]))


def test_beta_p_value_is_its_percentile_clipped():
    pct = np.array([0.0, 0.01, 25.0, 50.0, 100.0])
    got = combine.beta_p_value(pct, m=99)
    np.testing.assert_allclose(got, [0.01, 0.01, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(
        combine.beta_p_value(pct, 99, "upper"), [1.0, 0.9999, 0.75, 0.5, 0.01]
    )
    np.testing.assert_allclose(
        combine.beta_p_value(pct, 99, "two-sided"), [0.02, 0.02, 0.5, 1, 0.02]
    )


def test_fisher_is_the_library_fisher():
    p = _rng(3).uniform(0.001, 1.0, size=(50, 4))
    want = atypicality.fisher(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(combine.fisher(p), want, rtol=1e-12)


def test_cauchy_against_its_closed_form():
    p = np.array([[0.5, 0.25, 0.1], [0.9, 0.9, 0.9]])
    want0 = (math.tan(0.0) + math.tan(0.25 * math.pi) + math.tan(0.4 * math.pi)) / 3  # 1.3592
    want1 = math.tan(-0.4 * math.pi)
    np.testing.assert_allclose(combine.cauchy(p), [want0, want1], rtol=1e-9)
    assert combine.cauchy_p_value(np.array([0.0]))[0] == pytest.approx(0.5)
    assert combine.cauchy_p_value(np.array([want1]))[0] == pytest.approx(0.9)
    # clipped away from 0 and 1: tan((0.5 - eps) pi) ~ 1 / (pi eps), finite at p = 1
    eps = combine.CAUCHY_EPS
    edge = combine.cauchy(np.array([[1e-300, 0.5], [1.0, 1.0]]))
    assert edge[0] == pytest.approx(1 / (math.pi * eps) / 2, rel=1e-6)
    assert np.isfinite(edge[1]) and edge[1] < -1e13


def test_cauchy_p_value_is_uniform_under_independent_uniform_p_values():
    p = _rng(4).uniform(size=(20000, 4))
    combined = combine.cauchy_p_value(combine.cauchy(p))
    assert kstest(combined, "uniform").statistic < 0.015  # loose: the null's KS at n=20k ~0.01
    # monotone: a larger statistic, a smaller combined p-value
    t = combine.cauchy(p)
    order = np.argsort(t)
    assert (np.diff(combine.cauchy_p_value(t[order])) <= 0).all()


def test_min_p_with_the_bonferroni_correction():
    p = np.array([[0.01, 0.5, 0.3], [0.5, 0.6, 0.9], [0.4, 0.9, 0.9], [0.2, 0.9, 0.9]])
    np.testing.assert_allclose(
        combine.min_p(p), [-math.log(0.03), 0.0, 0.0, -math.log(0.6)], atol=1e-12
    )


def test_two_level_by_hand():
    p = np.array([[0.01, 0.2, 0.04], [0.9, 0.9, 0.001]])
    families = ["a", "a", "b"]
    # family a (two components): Fisher's chi-square(4) tail, sf(x, 4) = e^(-x/2) (1 + x/2)
    half = -math.log(0.01 * 0.2)
    p_a = math.exp(-half) * (1 + half)  # 0.01443
    want0 = -math.log(min(1.0, 2 * min(p_a, 0.04)))
    half1 = -math.log(0.81)
    p_a1 = math.exp(-half1) * (1 + half1)
    want1 = -math.log(min(1.0, 2 * min(p_a1, 0.001)))
    np.testing.assert_allclose(combine.two_level(p, families), [want0, want1], rtol=1e-10)
    # a lone family of one component is min-p of one: -log p
    np.testing.assert_allclose(combine.two_level(p[:, 2:], ["b"]), -np.log(p[:, 2]))
    with pytest.raises(ValueError, match="family labels"):
        combine.two_level(p, ["a"])


def _share_above_null(combiner, strong: float, j: int, seed: int) -> float:
    """Share of inputs (one component at ``strong``, ``j - 1`` uniform) whose score exceeds
    the 99th percentile of null inputs (``j`` uniform)."""
    rng = _rng(seed)
    null = combiner(rng.uniform(size=(20000, j)))
    test = rng.uniform(size=(500, j))
    test[:, 0] = strong
    return float((combiner(test) > np.quantile(null, 0.99)).mean())


def test_min_p_and_cauchy_do_not_dilute_a_strong_component():
    for combiner in (combine.min_p, combine.cauchy):
        assert _share_above_null(combiner, 1e-6, 4, seed=5) == 1.0


def test_fisher_dilutes_a_strong_component_among_many_uninformative_ones():
    # the docstring's claim where it holds: p = 1e-3 among seven uniform components
    assert _share_above_null(combine.fisher, 1e-3, 8, seed=6) < 0.5
    assert _share_above_null(combine.min_p, 1e-3, 8, seed=6) == 1.0
    assert _share_above_null(combine.cauchy, 1e-3, 8, seed=6) > 0.9


def test_energy_and_max_logit_are_pytorch_ood_s():
    ood = pytest.importorskip("pytorch_ood.detector")
    logits = _rng(7).normal(0, 4, size=(64, 10))
    t = torch.from_numpy(logits)
    np.testing.assert_allclose(combine.energy(logits), ood.EnergyBased.score(t).numpy(), rtol=1e-10)
    np.testing.assert_allclose(combine.max_logit(logits), ood.MaxLogit.score(t).numpy())


def _judged(rng: np.random.Generator, b: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """A synthetic judged set: components, logits and beta percentiles."""
    comps = rng.gamma(2.0, 1.0, size=(b, len(NAMES))).astype(np.float32) + shift
    return {
        "components": comps,
        "logits": rng.normal(0, 3, size=(b, 10)),
        "beta_percentile": rng.uniform(0, 100, size=b),
    }


def _references(rng: np.random.Generator) -> combine.References:
    """References of 400 synthetic training images."""
    train = _judged(rng, 400)
    return combine.References.of(train["components"], NAMES, train["logits"])


def test_references_p_values_against_the_tails():
    rng = _rng(8)
    refs = _references(rng)
    judged = _judged(rng, 30)
    want = combine.upper_tail(refs.sorted_values["energy"], combine.energy(judged["logits"]))
    np.testing.assert_allclose(refs.p_value(judged, "energy", "upper"), want)
    col = judged["components"][:, 3]
    want = combine.two_sided(refs.sorted_values["head_distance:h"], col)
    np.testing.assert_allclose(refs.p_value(judged, "head_distance:h", "two-sided"), want)
    np.testing.assert_allclose(
        refs.p_value(judged, "beta", "lower"),
        np.clip(judged["beta_percentile"] / 100, 1 / 401, 1),
    )
    assert refs.names() == [*NAMES, "energy", "max_logit", "beta"]
    with pytest.raises(ValueError, match="match"):
        combine.References.of(np.zeros((5, 3)), NAMES, np.zeros((5, 10)))


def test_candidates_are_declared_once_and_well_formed():
    names = [c.name for c in combine.CANDIDATES]
    assert len(set(names)) == len(names)
    assert names[0] == atypicality.FISHER_SCORE_NAME
    default = combine.CANDIDATES[0]
    assert default.combiner == "fisher" and not default.sides
    assert set(default.kinds) == {"expectation_mass", "stage_energy", "head_distance"}
    combiners = {c.combiner for c in combine.CANDIDATES}
    assert combiners == {"fisher", "cauchy", "min_p", "two_level"}
    kinds = {k for c in combine.CANDIDATES for k in c.kinds}
    assert {"beta", "energy", "max_logit"} <= kinds
    assert any(c.kinds == ("energy",) for c in combine.CANDIDATES)
    assert any(c.kinds == ("beta",) for c in combine.CANDIDATES)
    for c in combine.CANDIDATES[1:]:
        if "head_distance" in c.kinds:
            assert c.direction("head_distance:any") == "two-sided"


def test_candidate_scores_on_a_synthetic_judged_set():
    rng = _rng(9)
    refs = _references(rng)
    judged = _judged(rng, 40)
    got = combine.candidate_scores(judged, refs)
    assert list(got) == [c.name for c in combine.CANDIDATES]
    for name, s in got.items():
        assert s.shape == (40,) and np.isfinite(s).all(), name
    # the current default is the library's score on the same reference
    lib = atypicality.ScoreReference.of(
        torch.from_numpy(np.asarray(_judged(_rng(9), 400)["components"]))
    )
    want = lib.score(torch.from_numpy(judged["components"])).numpy()
    np.testing.assert_allclose(got[atypicality.FISHER_SCORE_NAME], want, rtol=1e-5)
    # energy alone: -log of energy's upper tail
    p = combine.upper_tail(refs.sorted_values["energy"], combine.energy(judged["logits"]))
    np.testing.assert_allclose(got["energy alone"], -np.log(p))


def test_the_two_sided_head_sees_an_input_closer_than_every_training_image():
    rng = _rng(10)
    refs = _references(rng)
    judged = _judged(rng, 1)
    judged["components"][:, 3] = -1.0  # below every reference head distance (all > 0)
    one = combine.Candidate("one-sided head", ("head_distance",), "min_p")
    two = combine.Candidate(
        "two-sided head", ("head_distance",), "min_p", {"head_distance": "two-sided"}
    )
    got = combine.candidate_scores(judged, refs, [one, two])
    assert got["one-sided head"][0] == pytest.approx(0.0)
    assert got["two-sided head"][0] == pytest.approx(-math.log(2 / 401))


def test_a_candidate_takes_every_layer_of_a_kind_whatever_its_names():
    cand = combine.CANDIDATES[0]
    names = ["expectation_mass", "stage_energy:features.3", "stage_energy:features.10",
             "stage_energy:features.20", "head_distance:features.30", "energy"]  # fmt: skip
    assert cand.columns(names) == names[:5]
    with pytest.raises(ValueError, match="no component"):
        cand.columns(["expectation_mass", "energy"])


STAGES = ("stage_mahalanobis:s1", "stage_mahalanobis:s2", "stage_mahalanobis:h")


def _staged(rng: np.random.Generator) -> tuple[combine.References, np.ndarray]:
    """References of 400 synthetic training images with stage distances of 300 reference
    images (chi-square-like), and those rows."""
    train = _judged(rng, 400)
    rows = rng.chisquare(8, size=(300, len(STAGES)))
    refs = combine.References.of(train["components"], NAMES, train["logits"], None, rows, STAGES)
    return refs, rows


def test_the_gate_threshold_is_a_share_of_the_reference_images_counted_by_hand():
    refs, rows = _staged(_rng(11))
    assert refs.names()[-3:] == list(STAGES)
    # each reference image's upper tail among the 300, counted by hand; Fisher's p by hand
    up = np.array([[(1 + (rows[:, j] >= v).sum()) / 301 for j, v in enumerate(r)] for r in rows])
    stat = -2 * np.log(up).sum(axis=1)
    log_p = np.log(chi2_sf(stat, 6))
    assert refs.gate_threshold(list(STAGES), 0.01) == pytest.approx(np.quantile(log_p, 0.01))
    # about 1% of the reference images lie at or beyond it
    assert (log_p <= refs.gate_threshold(list(STAGES), 0.01)).mean() == pytest.approx(
        0.01, abs=0.01
    )
    with pytest.raises(ValueError, match="no reference rows"):
        refs.gate_threshold(["expectation_mass"], 0.01)
    with pytest.raises(ValueError, match="gate level"):
        refs.gate_threshold(list(STAGES), 1.0)
    with pytest.raises(ValueError, match="stage rows"):
        combine.References.of(np.zeros((5, 4)), NAMES, np.zeros((5, 10)), None, rows, STAGES[:2])


def chi2_sf(x: np.ndarray, dof: int) -> np.ndarray:
    """The chi-square survival function for even ``dof`` in closed form (an oracle that is not
    scipy's): ``exp(-x/2) sum_{k < dof/2} (x/2)^k / k!``."""
    half = np.asarray(x, np.float64) / 2
    return np.exp(-half) * sum(half**k / math.factorial(k) for k in range(dof // 2))


def test_a_gated_candidate_ranks_inputs_beyond_the_gate_first_and_the_rest_by_energy():
    rng = _rng(12)
    refs, rows = _staged(rng)
    judged = _judged(rng, 50)
    judged["stage_mahalanobis"] = rng.chisquare(8, size=(50, len(STAGES)))
    far = [3, 17, 40]
    judged["stage_mahalanobis"][far] = [[60.0, 55.0, 70.0], [80.0, 90.0, 85.0], [45.0, 12.0, 48.0]]
    cand = combine.Candidate("gated", ("energy",), "fisher", gate=("stage_mahalanobis",))
    got = combine.candidate_scores(judged, refs, [cand])["gated"]
    # the three far inputs first, ordered by their tail ranks: beyond every reference image
    # in all three distances ties (the ranks saturate at 1/301), one within range comes after
    assert set(np.argsort(-got)[:3]) == set(far)
    assert got[17] == got[3] > got[40]
    # every other input in energy's order: exactly Fisher of energy's tail alone, unless gated
    p = combine.upper_tail(refs.sorted_values["energy"], combine.energy(judged["logits"]))
    gate_p = np.stack([refs.p_value(judged, n, "upper") for n in STAGES], axis=1)
    beyond = combine.fisher_log_p(gate_p) <= refs.gate_threshold(list(STAGES), 0.01)
    assert set(far) <= set(np.flatnonzero(beyond)) and beyond.sum() < 10
    np.testing.assert_allclose(got[~beyond], -2 * np.log(p[~beyond]))
    assert (got[beyond] > combine.GATE_OFFSET).all()
    # a gated candidate needs the stage distances of the judged set
    with pytest.raises(KeyError):
        combine.candidate_scores({k: v for k, v in judged.items() if k != "stage_mahalanobis"},
                                 refs, [cand])  # fmt: skip


def test_gated_refuses_a_rest_that_reaches_the_offset():
    with pytest.raises(ValueError, match="offset"):
        combine.gated(np.zeros(2), -1.0, np.array([1.0, combine.GATE_OFFSET]))
    with pytest.raises(ValueError, match="shape"):
        combine.gated(np.zeros(2), -1.0, np.zeros(3))
    np.testing.assert_allclose(
        combine.gated(np.array([-5.0, -0.5]), -1.0, np.array([2.0, 3.0])),
        [combine.GATE_OFFSET + 5.0, 3.0],
    )


def test_the_gated_candidates_are_declared_once():
    names = [c.name for c in combine.GATED_CANDIDATES]
    assert len(set(names)) == len(names) and not set(names) & {c.name for c in combine.CANDIDATES}
    for c in combine.GATED_CANDIDATES:
        assert c.gate == ("stage_mahalanobis",) and "energy" in c.kinds
    assert {c.gate_level for c in combine.GATED_CANDIDATES} == {0.01, 0.001}
    with pytest.raises(ValueError, match="gate_level"):
        combine.Candidate("bad", ("energy",), "fisher", gate=("stage_mahalanobis",), gate_level=0)
