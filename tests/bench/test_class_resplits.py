"""bench.alarms.class_resplits: how often the per-class check fails by chance, against
simulations, the exact interval and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.alarms import class_rates
from bench.alarms import class_resplits as cr
from bench.alarms.scores import alarm_rate


def _classes(sizes: list[int]) -> torch.Tensor:
    """Class labels, ``sizes[c]`` of class c, in order."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def test_interval_misses_count_the_classes_whose_exact_interval_leaves_out_the_rate():
    rng = np.random.default_rng(0)
    p = rng.random(3000)
    classes = rng.integers(0, 6, 3000)
    p[classes == 1] = 0.5  # no alarm at all
    p[(classes == 2) & (rng.random(3000) < 0.05)] = 0.001  # about 5%
    oracle = sum(not alarm_rate(p[classes == c], 0.01)["ci_low"] <= 0.01
                 <= alarm_rate(p[classes == c], 0.01)["ci_high"] for c in range(6))  # fmt: skip
    assert cr.interval_misses(p, classes, 6, 0.01) == oracle
    assert oracle >= 2  # classes 1 and 2 at least


def test_the_known_threshold_check_matches_a_binomial_simulation():
    inputs = [480, 500, 520] * 3 + [450]
    found = cr.oracle_check(inputs, 0.01)
    rng = np.random.default_rng(1)
    counts = rng.binomial(inputs, 0.01, size=(40000, len(inputs)))
    misses = np.stack([~class_rates.interval_holds(n, 0.01)[counts[:, i]]
                       for i, n in enumerate(inputs)], axis=1)  # fmt: skip
    assert found["expected_misses"] == pytest.approx(misses.sum(1).mean(), abs=0.02)
    assert found["pass_probability"] == pytest.approx((misses.sum(1) == 0).mean(), abs=0.01)
    assert 0.7 < found["pass_probability"] < 0.85


def test_resplits_of_exchangeable_scores_with_per_class_nulls_miss_as_chance_says():
    """Classes with different score distributions, re-split at random: the library's per-class
    nulls miss about as often as class_rates' Monte Carlo of the null's and the binomial draw
    says; the pooled null misses more (the classes' tails differ)."""
    rng = np.random.default_rng(2)
    sizes = [950] * 5
    scores = torch.from_numpy(np.concatenate([rng.exponential(1 + c, n) for c, n
                                              in enumerate(sizes)])).float()  # fmt: skip
    classes = _classes(sizes)
    per_class = cr.resplit_misses(scores, classes, 5, 2250, cr.per_class_p_values, 0.01, 300, 3)
    expected = class_rates.expected_interval_misses([(450, 500)] * 5, 0.01)
    assert per_class.mean() == pytest.approx(expected, abs=0.15)
    pooled = cr.resplit_misses(scores, classes, 5, 2250, cr.pooled_p_values, 0.01, 100, 3)
    assert pooled.mean() > 2.5 > 2 * per_class.mean()


def test_standardised_p_values_level_classes_that_differ_by_location_and_scale():
    """Class c's scores are ``c + (1 + c) X``: the pooled null lets the widest class alarm far
    above nominal and the narrowest not at all; standardised per class, each holds the rate."""
    rng = np.random.default_rng(4)
    k, n = 4, 20000
    classes = _classes([n] * k)

    def draw() -> torch.Tensor:
        """One draw of every class's scores."""
        x = rng.standard_normal(k * n)
        return torch.from_numpy(classes.numpy() + (1 + classes.numpy()) * x).float()

    null, scores = draw(), draw()
    p = cr.standardised_p_values(null, classes, scores, classes, k)
    for c in range(k):
        assert 0.008 < (p[classes.numpy() == c] <= 0.01).mean() < 0.012, c
    pooled = cr.pooled_p_values(null, classes, scores, classes, k)
    assert (pooled[classes.numpy() == 3] <= 0.01).mean() > 0.025
    assert (pooled[classes.numpy() == 0] <= 0.01).mean() < 0.001


def test_per_class_p_values_are_the_monitor_s():
    """Each class's own null (all three have >= 200), interpolated: ``(k + f) / (n + 1)``
    counted by hand (scores inside every null's range, so each has a gap around it)."""
    rng = np.random.default_rng(5)
    null = torch.from_numpy(rng.random(900)).float()
    null_classes = torch.from_numpy(rng.integers(0, 3, 900))
    scores = torch.from_numpy(rng.uniform(0.05, 0.95, 50)).float()
    classes = torch.from_numpy(rng.integers(0, 3, 50))
    p = cr.per_class_p_values(null, null_classes, scores, classes, 3)
    for i in range(50):
        mine = null[null_classes == classes[i]].numpy()
        s = scores[i].item()
        k = int((mine >= s).sum())
        upper, lower = mine[mine >= s].min(), mine[mine < s].max()
        f = (upper - s) / (upper - lower)
        assert p[i] == pytest.approx((k + f) / (mine.size + 1), abs=1e-6)


def test_halves_differ_reads_a_shifted_class_and_not_an_exchangeable_one():
    rng = np.random.default_rng(6)
    null_classes, classes = _classes([400, 400, 0]), _classes([400, 400, 5])
    null = torch.from_numpy(rng.standard_normal(800)).float()
    scores = torch.from_numpy(rng.standard_normal(805)).float()
    scores[400:800] += 0.5
    p = cr.halves_differ(null, null_classes, scores, classes, 3)
    assert p[0] > 0.01 and p[1] < 1e-6 and p[2] is None


def test_a_null_as_large_as_the_images_is_refused():
    s, c = torch.zeros(10), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="null_size"):
        cr.resplit_misses(s, c, 1, 10, cr.pooled_p_values, 0.01)
