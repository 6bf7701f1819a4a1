"""The p-value window: KS distance against scipy, eviction, threads, and the drift rule's
critical value (false alarms at its significance on exchangeable data, power on a shift)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import stats

from surprise_monitor.monitor.conformal import ConformalNull
from surprise_monitor.monitor.runtime.window import (
    PValueWindow,
    ks_critical_value,
    ks_distance_from_uniform,
)


@pytest.mark.parametrize("m", [1, 2, 7, 100, 1000])
def test_ks_distance_is_scipys(m):
    rng = np.random.default_rng(m)
    for p in (rng.uniform(size=m), rng.beta(0.5, 1.0, size=m), rng.integers(1, 11, m) / 11):
        want = stats.kstest(p, "uniform").statistic
        assert ks_distance_from_uniform(p) == pytest.approx(want, abs=1e-12)
    assert ks_distance_from_uniform(np.array([])) == 0.0


def test_critical_values():
    # c(a) = sqrt(-ln(a/2)/2): the leading term of Kolmogorov's distribution, close to its
    # exact asymptotic quantile at small significance
    for a in (0.001, 0.01, 0.05):
        assert ks_critical_value(a, 1) == pytest.approx(stats.kstwobign.isf(a), rel=2e-3)
    assert ks_critical_value(0.001, 1000, 2000) == pytest.approx(
        np.sqrt(np.log(2000) / 2) * np.sqrt(1 / 1000 + 1 / 2000)
    )
    with pytest.raises(ValueError, match="significance"):
        ks_critical_value(0.0, 10)


def test_window_keeps_the_last_values_and_skips_nan():
    w = PValueWindow(4, alarm_rate=0.1)
    assert w.stats()[0] == 0 and np.isnan(w.stats()[1]) and np.isnan(w.stats()[2])
    w.add([0.05, float("nan"), 0.5])
    w.add([0.9, 0.2, 0.01])
    np.testing.assert_array_equal(w.snapshot(), [0.5, 0.9, 0.2, 0.01])
    m, rate, d = w.stats()
    assert (m, rate) == (4, 0.25)
    assert d == pytest.approx(stats.kstest([0.5, 0.9, 0.2, 0.01], "uniform").statistic)
    with pytest.raises(ValueError, match="window size"):
        PValueWindow(0, 0.01)


def test_window_is_thread_safe():
    w = PValueWindow(100_000, 0.01)
    values = [np.random.default_rng(t).uniform(size=500) for t in range(8)]

    def add(t: int) -> None:
        for chunk in np.split(values[t], 50):
            w.add(chunk.tolist())
            w.stats()

    threads = [threading.Thread(target=add, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    np.testing.assert_array_equal(np.sort(w.snapshot()), np.sort(np.concatenate(values)))


def test_the_drift_rule_holds_its_significance_and_sees_a_shift():
    """Conformal p-values of a window of m fresh scores against a null of n: D exceeds
    c(a) sqrt(1/m + 1/n) at about rate a on exchangeable data (not c(a)/sqrt(m), which forgets
    the null's own noise), and almost always when 10% of the window is atypical."""
    rng = np.random.default_rng(0)
    n, m, trials, a = 2000, 1000, 400, 0.01
    crit = ks_critical_value(a, m, n)
    one_sample = ks_critical_value(a, m)
    over, over_one_sample, shifted = 0, 0, 0
    for _ in range(trials):
        null = ConformalNull.of(_torch(rng.normal(size=n)))
        d = ks_distance_from_uniform(_p(null, rng.normal(size=m)))
        over += d > crit
        over_one_sample += d > one_sample
        mixed = np.concatenate([rng.normal(size=m - m // 10), rng.normal(4.0, 1.0, m // 10)])
        shifted += ks_distance_from_uniform(_p(null, mixed)) > crit
    # binomial(400, 0.01): mean 4, P(X > 12) < 1e-3
    assert over <= 12, over
    assert over_one_sample > 12  # c(a)/sqrt(m) alone forgets the null's noise (n = 2 m)
    assert shifted >= trials - 4


def _torch(values: np.ndarray):
    import torch

    return torch.from_numpy(values.astype(np.float32))


def _p(null: ConformalNull, scores: np.ndarray) -> np.ndarray:
    return null.p_values(_torch(scores)).double().numpy()
