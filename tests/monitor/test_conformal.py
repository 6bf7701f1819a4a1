"""Conformal p-values against a numpy oracle, and the finite-sample false-alarm guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.monitor.conformal import (
    ClassConditionalNull,
    ConformalNull,
    binomial_upper_tail,
    conditional_level,
    resampled_alarm_rate,
)
from surprise_monitor.monitor.options import Thresholds
from tests._checks import interpolated_p


def oracle_p(null: np.ndarray, s: float) -> float:
    """(1 + #{null >= s}) / (n + 1), counted by numpy."""
    return (1 + int(np.sum(null >= s))) / (len(null) + 1)


def test_p_values_match_the_counting_oracle_with_ties():
    rng = np.random.default_rng(0)
    null = np.round(rng.normal(size=200), 1).astype(np.float32)  # many ties
    queries = np.concatenate([null[:30], np.round(rng.normal(size=50), 1), [-9, 9]]).astype(
        np.float32
    )
    found = ConformalNull.of(torch.from_numpy(null)).p_values(torch.from_numpy(queries))
    want = np.array([oracle_p(null, q) for q in queries], np.float32)
    np.testing.assert_allclose(found.numpy(), want, rtol=0, atol=1e-7)
    assert found[-2] == 1.0 and found[-1] == pytest.approx(1 / 201)


def test_a_nan_score_is_the_most_atypical():
    null = ConformalNull.of(torch.arange(9.0))
    assert null.p_values(torch.tensor([float("nan")])).item() == pytest.approx(0.1)


def test_threshold_agrees_with_the_p_values():
    rng = np.random.default_rng(1)
    null = ConformalNull.of(torch.from_numpy(rng.normal(size=999).astype(np.float32)))
    for rate in (0.001, 0.01, 0.05, 0.5):
        t = null.threshold(rate)
        s = torch.tensor([t, np.nextafter(np.float32(t), np.float32(np.inf))])
        p = null.p_values(s)
        assert p[0] > rate and p[1] <= rate, (rate, t, p)
    assert null.threshold(0.0005) == float("inf")  # (n + 1) * rate < 1: no score alarms
    assert null.smallest_rate() == pytest.approx(0.001)


@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_alarm_rate_never_exceeds_the_nominal_one_on_exchangeable_data(rate):
    """Over many independent nulls and test sets drawn from one distribution, the average alarm
    rate is floor(rate * (n + 1)) / (n + 1) <= rate (the finite-sample guarantee)."""
    g = torch.Generator().manual_seed(0)
    n, trials, per = 149, 400, 200
    rates = []
    for _ in range(trials):
        null = ConformalNull.of(torch.randn(n, generator=g))
        rates.append(float((null.p_values(torch.randn(per, generator=g)) <= rate).float().mean()))
    expected = int(rate * (n + 1) + 1e-9) / (n + 1)
    se = np.std(rates) / np.sqrt(trials)
    assert abs(np.mean(rates) - expected) < 4 * se
    assert expected <= rate


def test_bad_nulls_and_rates_are_refused():
    with pytest.raises(ValueError, match="sorted ascending"):
        ConformalNull(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ConformalNull(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="1-D tensor"):
        ConformalNull(torch.zeros(0))
    null = ConformalNull(torch.tensor([0.0, 1.0, 2.0]))
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="alarm_rate must be a fraction in \\(0, 1\\)"):
            null.threshold(bad)
        with pytest.raises(ValueError, match="alarm_rate must be a fraction in \\(0, 1\\)"):
            resampled_alarm_rate(null.scores, torch.zeros(4), bad)


def test_resampled_alarm_rate_counts_each_re_split_like_numpy():
    """Five re-splits recomputed with numpy counting on the same permutations; and over many
    re-splits of exchangeable scores the mean is the exact conformal rate."""
    rng = np.random.default_rng(4)
    null, fresh = rng.normal(size=199), rng.normal(size=300)
    got = resampled_alarm_rate(torch.from_numpy(null), torch.from_numpy(fresh), 0.05, draws=5)
    pooled = np.concatenate([null, fresh]).astype(np.float32)
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(5):
        order = torch.randperm(len(pooled), generator=g).numpy()
        n_, ev = pooled[order[:199]], pooled[order[199:]]
        rates.append(np.mean([oracle_p(n_, s) <= 0.05 for s in ev]))
    assert got["draws"] == 5 and got["mean"] == pytest.approx(np.mean(rates), abs=1e-12)
    assert got["p5"] == pytest.approx(np.quantile(rates, 0.05), abs=1e-12)
    many = resampled_alarm_rate(torch.from_numpy(null), torch.from_numpy(fresh), 0.05, 1000)
    assert many["mean"] == pytest.approx(10 / 200, abs=0.002)  # floor(0.05 * 200) / 200
    assert many["p5"] < many["mean"] < many["p95"]
    with pytest.raises(ValueError, match="alarm_rate must be a fraction"):
        resampled_alarm_rate(torch.zeros(3), torch.zeros(3), 1.5)


# ------------------------------------------------------------------ per-class (Mondrian) nulls
def test_class_p_values_match_the_per_class_counting_oracle():
    rng = np.random.default_rng(2)
    k, n = 4, 900
    classes = rng.integers(0, k, size=n)
    classes[classes == 3] = 2  # class 3 has no held-out input at all
    scores = (np.round(rng.normal(size=n), 1) + classes).astype(np.float32)  # ties, shifted
    nulls = ClassConditionalNull.of(torch.from_numpy(scores), torch.from_numpy(classes), k, 200)
    assert nulls.sizes.tolist() == [int((classes == c).sum()) for c in range(k)]
    assert nulls.pooled_classes() == [3]
    q_cls = np.repeat(np.arange(k), 40)
    queries = (rng.normal(size=q_cls.size) * 2 + q_cls).astype(np.float32)
    queries[:3] = [scores[classes == 0][0], -99.0, 99.0]  # a tie, below all, above all
    pooled = ConformalNull.of(torch.from_numpy(scores))
    fallback = pooled.p_values(torch.from_numpy(queries))
    found = nulls.p_values(torch.from_numpy(queries), torch.from_numpy(q_cls), fallback)
    want = [
        oracle_p(scores[classes == c], q) if c != 3 else oracle_p(scores, q)
        for q, c in zip(queries, q_cls, strict=True)
    ]
    np.testing.assert_allclose(found.numpy(), np.array(want, np.float32), rtol=0, atol=1e-7)
    assert found[2] == pytest.approx(1 / (nulls.sizes[0].item() + 1)) and found[1] == 1.0
    nan = nulls.p_values(torch.tensor([float("nan")]), torch.tensor([1]), torch.tensor([0.5]))
    assert nan.item() == pytest.approx(1 / (nulls.sizes[1].item() + 1))


def test_a_class_below_the_minimum_uses_the_pooled_null():
    scores, classes = torch.arange(10.0), torch.tensor([0] * 6 + [1] * 4)
    nulls = ClassConditionalNull.of(scores, classes, 2, min_size=5)
    fallback = torch.tensor([0.25, 0.75])
    p = nulls.p_values(torch.tensor([5.5, 5.5]), torch.tensor([0, 1]), fallback)
    assert p.tolist() == [pytest.approx(1 / 7), 0.75]  # class 0: its own 6; class 1: pooled
    assert ClassConditionalNull.of(scores, classes, 2, min_size=4).pooled_classes() == []


def test_per_class_nulls_hold_each_class_rate_where_the_pooled_null_does_not():
    """The issue's case: one pooled null over classes whose scores differ lets the class with
    high scores alarm at several times the nominal rate; per-class nulls hold every class's
    rate within its binomial interval, and the overall rate too."""
    g = torch.Generator().manual_seed(0)
    k, per_class, rate = 5, 10_000, 0.01
    shift = torch.tensor([0.0, 0.0, 0.3, 0.6, 1.2])  # class 4's normal inputs score higher

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cls = torch.arange(k).repeat_interleave(n)
        return torch.randn(cls.numel(), generator=g) + shift[cls], cls

    null_scores, null_cls = draw(per_class)
    test_scores, test_cls = draw(2 * per_class)
    pooled = ConformalNull.of(null_scores).p_values(test_scores)
    nulls = ClassConditionalNull.of(null_scores, null_cls, k, 200)
    mondrian = nulls.p_values(test_scores, test_cls, pooled)
    n = 2 * per_class  # test inputs per class; the null's own draw moves a class's rate by
    half = 1.96 * np.sqrt(rate * (1 - rate) / n) + 2 * np.sqrt(rate / per_class)  # ~sqrt(a/n)
    for c in range(k):
        mine = test_cls == c
        assert abs(float((mondrian[mine] <= rate).float().mean()) - rate) < half, c
    assert float((pooled[test_cls == 4] <= rate).float().mean()) > 3 * rate  # pooled: uneven
    assert float((pooled[test_cls == 0] <= rate).float().mean()) < rate / 4
    assert abs(float((mondrian <= rate).float().mean()) - rate) < 0.003


def test_bad_class_nulls_are_refused():
    with pytest.raises(ValueError, match="sum to"):
        ClassConditionalNull(torch.arange(3.0), torch.tensor([1, 1]), 1)
    with pytest.raises(ValueError, match="sorted"):
        ClassConditionalNull(torch.tensor([2.0, 1.0]), torch.tensor([2]), 1)
    with pytest.raises(ValueError, match="min_size"):
        ClassConditionalNull(torch.tensor([1.0]), torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="lie in"):
        ClassConditionalNull.of(torch.zeros(2), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="NaN"):
        ClassConditionalNull(torch.tensor([float("nan")]), torch.tensor([1]), 1)


# ------------------------------------------------------------ calibration-conditional level
@pytest.mark.parametrize(
    ("n", "rate", "confidence"),
    [(999, 0.01, 0.9), (4999, 0.01, 0.95), (500, 0.05, 0.8), (5000, 0.001, 0.9)],
)
def test_conditional_level_is_the_largest_beta_quantile_below_the_rate(n, rate, confidence):
    """scipy as the oracle: alarming at p <= j / (n + 1) fires on a Beta(j, n + 1 - j) share of
    normal inputs; the level's j is the largest with P(share <= rate) >= confidence."""
    from scipy.stats import beta, binom

    level = conditional_level(n, rate, confidence)
    j = int(level * (n + 1))  # level = (j + 0.5) / (n + 1)
    assert level == pytest.approx((j + 0.5) / (n + 1)) and j <= rate * (n + 1)
    if j:
        assert beta.cdf(rate, j, n + 1 - j) >= confidence - 1e-9
    assert beta.cdf(rate, j + 1, n - j) < confidence  # j + 1 would not hold
    for k in (1, j, j + 1):
        assert binomial_upper_tail(n, rate, k) == pytest.approx(binom.sf(k - 1, n, rate), abs=1e-9)
    assert conditional_level(n, rate, 0.0) == rate  # marginal: the rate itself


def test_conditional_level_holds_over_null_draws_where_the_marginal_does_not():
    """Uniform scores: given a null, alarms at p <= level fire on the mass above the null's
    j-th largest score. Over many nulls that share exceeds the rate in at most 1 - confidence
    of the draws; at the marginal level it does in nearly half of them."""
    rng = np.random.default_rng(3)
    n, rate, confidence, draws = 999, 0.01, 0.9, 4000
    j = int(conditional_level(n, rate, confidence) * (n + 1))
    j0 = int(rate * (n + 1))
    nulls = np.sort(rng.random((draws, n)), axis=1)
    share = 1.0 - nulls[:, n - j]  # above the j-th largest
    marginal = 1.0 - nulls[:, n - j0]
    exceed = float(np.mean(share > rate))
    assert exceed <= 1 - confidence + 3 * np.sqrt(0.1 * 0.9 / draws)
    assert float(np.mean(marginal > rate)) > 0.35
    assert abs(float(np.mean(marginal)) - j0 / (n + 1)) < 0.0005  # the marginal guarantee


def test_bad_confidence_is_refused():
    with pytest.raises(ValueError, match="alarm_confidence"):
        conditional_level(100, 0.01, 1.0)
    assert conditional_level(50, 0.01, 0.9) == pytest.approx(0.5 / 51)  # too small: no alarms


def test_interpolated_p_values_match_the_oracle_and_lie_within_a_gap_of_the_conservative():
    rng = np.random.default_rng(3)
    null = np.round(rng.normal(size=200), 1).astype(np.float32)  # ties too
    queries = np.concatenate([null[:30], rng.normal(size=200), [-9, 9, null.max()]])
    queries = queries.astype(np.float32)
    found = ConformalNull.of(torch.from_numpy(null))
    got = found.p_values(torch.from_numpy(queries), interpolated=True).numpy()
    want = [interpolated_p(null, float(q)) for q in queries]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    conservative = found.p_values(torch.from_numpy(queries)).numpy()
    assert (got <= conservative + 1e-7).all() and (got >= conservative - 1 / 201 - 1e-7).all()
    assert got[-3] == 1.0 and got[-2] == got[-1] == pytest.approx(1 / 201)  # the ends
    nan = found.p_values(torch.tensor([float("nan")]), interpolated=True)
    assert nan.item() == pytest.approx(1 / 201)


def test_interpolated_p_values_are_continuous_and_decreasing():
    null = ConformalNull.of(torch.tensor([0.0, 1.0, 3.0, 4.0]))
    grid = torch.linspace(0.01, 4.0, 400)
    p = null.p_values(grid, interpolated=True)
    assert (p[1:] <= p[:-1] + 1e-7).all()
    step = float(grid[1] - grid[0])
    assert float((p[1:] - p[:-1]).abs().max()) < 0.2 * step + 1e-6  # no jump: slope <= 1/5
    at = null.p_values(torch.tensor([1.0, 2.0, 3.0]), interpolated=True)
    torch.testing.assert_close(at, torch.tensor([3 / 5, 2.5 / 5, 2 / 5]))


@pytest.mark.parametrize(("n", "least"), [(450, 0.0096), (149, 0.0085)])
def test_interpolated_p_values_alarm_on_the_nominal_rate_where_conservative_ones_do_not(n, least):
    """Over many nulls and fresh sets from one distribution (an exponential tail), the
    conservative p-value alarms on ``floor(0.01 (n + 1)) / (n + 1)`` (0.887% for 450, 0.667%
    for 149), the interpolated one on about 1%: a little less where the density falls across
    the gap it interpolates, the more so the wider that gap (the 149's, the top one's)."""
    g = torch.Generator().manual_seed(1)
    trials, per = 1500, 2000
    found = {False: [], True: []}
    for _ in range(trials):
        null = ConformalNull.of(torch.empty(n).exponential_(generator=g))
        fresh = torch.empty(per).exponential_(generator=g)
        for interpolated, rates in found.items():
            rates.append(float((null.p_values(fresh, interpolated) <= 0.01).float().mean()))
    conservative, interpolated = np.mean(found[False]), np.mean(found[True])
    sd = np.std(found[True]) / np.sqrt(trials)  # ~0.012 pp
    assert abs(conservative - int(0.01 * (n + 1)) / (n + 1)) < 4 * sd
    assert least < interpolated < 0.01 + 4 * sd
    assert interpolated - conservative > 0.0008


def test_class_interpolated_p_values_are_each_class_s_and_the_fallback_s():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=600).astype(np.float32)
    classes = np.repeat([0, 1, 2], [300, 250, 50])
    nulls = ClassConditionalNull.of(torch.from_numpy(scores), torch.from_numpy(classes), 3, 100)
    s = rng.normal(size=90).astype(np.float32)
    s[:3] = [9, -9, scores[classes == 1].max()]
    k = np.resize([0, 1, 2], 90)
    pooled = ConformalNull.of(torch.from_numpy(scores)).p_values(torch.from_numpy(s), True)
    got = nulls.p_values(torch.from_numpy(s), torch.from_numpy(k), pooled, interpolated=True)
    want = [interpolated_p(scores[classes == c] if c < 2 else scores, float(v))
            for v, c in zip(s, k, strict=True)]  # fmt: skip
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_the_monitor_interpolates_unless_told_or_a_confidence_is_asked():
    assert Thresholds().interpolated and Thresholds().p_values == "interpolated"
    assert not Thresholds(p_values="conservative").interpolated
    assert not Thresholds(alarm_confidence=0.9).interpolated  # whole gaps: conservative
    with pytest.raises(ValueError, match=r"p_values must be one of \('interpolated', "):
        Thresholds(p_values="smoothed")
