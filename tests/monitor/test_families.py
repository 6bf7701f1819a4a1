"""Per-family p-values (:mod:`surprise_monitor.monitor.families`) against numpy: the columns
of each family, Tippett's statistic, the conformal p-values, their validity on exchangeable
inputs and the kind they name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from surprise_monitor.monitor.families import (
    FAMILIES,
    FamilyNulls,
    family_columns,
    family_statistics,
    kind_of,
)

GATED_NAMES = (
    "expectation_mass", "stage_energy:l1", "stage_energy:l2", "head_distance:h", "energy",
    "stage_distance:l1", "stage_distance:l2", "stage_distance:h", "knn_distance:h",
)  # fmt: skip
COLUMNS = family_columns(GATED_NAMES)


def test_each_component_is_in_its_family_and_the_head_s_stage_distance_in_features():
    assert dict(zip(FAMILIES, COLUMNS, strict=True)) == {
        "class_evidence": (0, 4), "low_level": (1, 2, 5, 6), "features": (3, 7, 8),
    }  # fmt: skip
    fisher = family_columns(("expectation_mass", "stage_energy:l1", "mystery"))
    assert fisher == ((0,), (1,), ())  # no head: no features; an unknown name in no family


def _oracle_statistics(ranks: np.ndarray, columns) -> np.ndarray:
    """numpy: ``-log`` of each family's smallest finite rank, NaN without one."""
    out = np.full((len(ranks), len(columns)), np.nan)
    for f, cols in enumerate(columns):
        if cols:
            part = ranks[:, list(cols)]
            finite = ~np.isnan(part).all(axis=1)
            out[finite, f] = -np.log(np.nanmin(part[finite], axis=1))
    return out


def _oracle_p(null: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy: ``(1 + #{null >= t}) / (n + 1)``, NaN for NaN."""
    p = (1 + (null[None, :] >= t[:, None]).sum(axis=1)) / (len(null) + 1)
    return np.where(np.isnan(t), np.nan, p)


def test_the_statistics_are_tippett_s_over_finite_ranks():
    rng = np.random.default_rng(0)
    ranks = rng.uniform(0.001, 1, (50, len(GATED_NAMES)))
    ranks[3, [0, 4]] = np.nan  # no class evidence at all
    ranks[5, 1] = np.nan  # one low-level rank missing: the others decide
    got = family_statistics(torch.tensor(ranks, dtype=torch.float32), COLUMNS).double().numpy()
    want = _oracle_statistics(ranks, COLUMNS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isnan(got[3, 0]) and np.isfinite(got[5, 1])
    on_device = [torch.tensor(c, dtype=torch.int64) for c in COLUMNS]
    again = family_statistics(torch.tensor(ranks, dtype=torch.float32), on_device)
    torch.testing.assert_close(again, torch.tensor(got, dtype=torch.float32), equal_nan=True)
    ranks[7, 5] = 0.0  # a tail rank that underflowed: the largest finite statistic
    zero = family_statistics(torch.tensor(ranks, dtype=torch.float32), COLUMNS)[7, 1]
    assert float(zero) == pytest.approx(-np.log(np.finfo(np.float32).tiny), rel=1e-6)


def test_the_p_values_are_ranks_among_the_null_and_nan_stays_nan():
    rng = np.random.default_rng(1)
    null_stats = rng.exponential(1.0, (300, 3))
    null_stats[:, 2] = rng.exponential(1.0, 300).round(1)  # ties among the null
    nulls = FamilyNulls.of(torch.tensor(null_stats, dtype=torch.float32))
    assert nulls.sizes == [300, 300, 300]
    test = rng.exponential(1.3, (40, 3)).astype(np.float32)
    test[0, 1] = np.nan
    test[1, 2] = null_stats[7, 2]  # equal to null values: counted as >=
    got = nulls.p_values(torch.tensor(test)).double().numpy()
    for f in range(3):
        want = _oracle_p(null_stats[:, f].astype(np.float32), test[:, f])
        np.testing.assert_allclose(got[:, f], want, rtol=1e-6)
    assert np.isnan(got[0, 1])
    partial = FamilyNulls((nulls.nulls[0], nulls.nulls[1], None))
    assert np.isnan(partial.p_values(torch.tensor(test))[:, 2].numpy()).all()
    assert partial.sizes == [300, 300, 0]


def test_a_null_with_a_nan_statistic_is_left_out_and_a_bad_shape_refused():
    stats = torch.rand(20, 3)
    stats[4, 2] = float("nan")  # a score without features: no features null
    assert FamilyNulls.of(stats).sizes == [20, 20, 0]
    with pytest.raises(ValueError, match=r"must be \[n, 3\]"):
        FamilyNulls.of(torch.rand(20, 2))
    with pytest.raises(ValueError, match="need 3 entries"):
        FamilyNulls((None,))


def test_each_family_s_p_value_is_valid_on_exchangeable_inputs():
    """Correlated components within a family (a shared factor): each family's p-value falls
    at or below 5% on about 5% of fresh inputs drawn as the null was, where the Bonferroni
    bound of the smallest rank times the family's size would fall there far less often."""
    rng = np.random.default_rng(2)

    def draw(n: int) -> np.ndarray:
        """``n`` inputs' uniform tail ranks, strongly correlated through a shared factor."""
        shared = rng.normal(size=(n, 1))
        z = 0.9 * shared + np.sqrt(1 - 0.9**2) * rng.normal(size=(n, len(GATED_NAMES)))
        return norm.sf(z)

    nulls = FamilyNulls.of(family_statistics(torch.tensor(draw(999)), COLUMNS))
    fresh = draw(20000)
    p = nulls.p_values(family_statistics(torch.tensor(fresh), COLUMNS)).numpy()
    rates = (p <= 0.05).mean(axis=0)
    # 4 sd of 20,000 fresh inputs (0.6 pp) and 3 sd of the null's draw of 999 (2.1 pp)
    tolerance = 4 * np.sqrt(0.05 * 0.95 / 20000) + 3 * np.sqrt(0.05 * 0.95 / 1000)
    assert (np.abs(rates - 0.05) <= tolerance).all(), rates
    low_level = list(COLUMNS[1])
    bonferroni = (fresh[:, low_level].min(axis=1) * len(low_level) <= 0.05).mean()
    assert bonferroni < 0.7 * rates[1]  # conservative where the null-calibrated one is not


def test_the_kind_is_the_family_of_the_smallest_p_value_ties_by_the_smallest_rank():
    ranks = [0.5] * len(GATED_NAMES)
    assert kind_of([0.2, 0.001, 0.03]) == "low_level"
    assert kind_of([float("nan"), 0.4, 0.03]) == "features"
    assert kind_of([float("nan")] * 3) is None
    ranks[8] = 1e-6  # knn: the smallest rank of all
    assert kind_of([0.001, 0.5, 0.001], ranks, COLUMNS) == "features"
    ranks[8], ranks[0] = 0.5, 1e-7
    assert kind_of([0.001, 0.5, 0.001], ranks, COLUMNS) == "class_evidence"
    assert kind_of([0.001, 0.5, 0.001]) == "class_evidence"  # no ranks: the first listed
