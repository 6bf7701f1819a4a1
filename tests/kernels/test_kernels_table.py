"""prepare_lookup_table: conversion, pass-through and re-derivation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surprise_monitor.kernels import LookupTable, prepare_lookup_table


def _np_table():
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        levels=np.array([0, 0.1, 50, 99.9, 100], dtype=np.float64),
        quantiles=np.sort(rng.normal(size=(3, 4, 5)), axis=-1),
        mean=rng.normal(size=(3, 4)),
    )


def test_numpy_and_torch_inputs_give_the_same_float32_table():
    raw = _np_table()
    a = prepare_lookup_table(raw)
    b = prepare_lookup_table(
        SimpleNamespace(**{k: torch.from_numpy(v) for k, v in vars(raw).items()})
    )
    assert isinstance(a, LookupTable)
    assert (a.num_classes, a.num_filters, a.num_levels) == (3, 4, 5)
    assert a.device == torch.device("cpu")
    for name in ("levels", "quantiles", "mean", "class_mean", "surprise_value",
                 "expectation_value"):  # fmt: skip
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == torch.float32 and ta.is_contiguous()
        assert torch.equal(ta, tb), name
    assert a.expectation_guard.dtype == torch.bool
    assert torch.equal(a.expectation_guard, b.expectation_guard)
    assert (a.surprise_pct, a.expectation_pct) == (99.9, 0.1)
    assert (a.surprise.column, a.expectation.column) == (3, 1)  # grid levels: read per class
    assert a.surprise.values is None and a.expectation.values is None
    q = torch.from_numpy(raw.quantiles).float()
    assert torch.equal(a.quantiles, q)
    assert a.calibrated.tolist() == [True] * 3 and a.beta_grid is None  # no counts, no beta
    assert torch.equal(a.surprise_value, q[..., 3])
    assert torch.equal(a.expectation_value, q[..., 1])
    m = raw.mean
    np.testing.assert_array_equal(a.expectation_guard.numpy(), m > m.mean(axis=1, keepdims=True))


def test_prepared_table_passes_through_or_is_rederived():
    table = prepare_lookup_table(_np_table())
    assert prepare_lookup_table(table) is table
    assert prepare_lookup_table(table, device="cpu") is table
    other = prepare_lookup_table(table, surprise_pct=50.0, expectation_pct=0.0)
    assert other is not table and other.quantiles is table.quantiles
    assert torch.equal(other.surprise_value, table.quantiles[..., 2])
    assert torch.equal(other.expectation_value, table.quantiles[..., 0])
    assert (other.surprise_pct, other.expectation_pct) == (50.0, 0.0)
    between = prepare_lookup_table(table, surprise_pct=75.0)  # between levels 50 and 99.9
    assert between.surprise.column is None
    q = table.quantiles
    expect = q[..., 2] + (q[..., 3] - q[..., 2]) * ((75.0 - 50.0) / (99.9 - 50.0))
    torch.testing.assert_close(between.surprise_value, expect)


def test_the_grid_is_used_in_place_and_a_checked_one_is_not_read():
    """On the CPU the table's grid is used as it is (a memory-mapped table stays on disk);
    ``grid_checked`` skips the value checks; a bad table is still refused without it."""
    raw = _np_table()
    grid = torch.from_numpy(raw.quantiles).float()
    table = prepare_lookup_table(SimpleNamespace(levels=raw.levels, quantiles=grid, mean=raw.mean))
    assert table.quantiles.data_ptr() == grid.data_ptr()
    level_major = grid.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # any strides will do
    assert prepare_lookup_table(
        SimpleNamespace(levels=raw.levels, quantiles=level_major, mean=raw.mean)
    ).quantiles.data_ptr() == level_major.data_ptr()  # fmt: skip
    bad = grid.clone()
    bad[2, 1, 1] = float("nan")
    checked = SimpleNamespace(levels=raw.levels, quantiles=bad, mean=raw.mean)
    with pytest.raises(ValueError, match="non-finite"):
        prepare_lookup_table(checked)
    checked.grid_checked = True  # vouched for: only levels and shapes are checked
    assert torch.isnan(prepare_lookup_table(checked).quantiles).any()
    checked.levels = raw.levels[::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        prepare_lookup_table(checked)


def test_counts_and_the_beta_grid_are_prepared():
    raw = _np_table()
    raw.counts = np.array([5, 0, 2])
    raw.beta_levels = np.array([0.0, 1.0, 50.0, 100.0])
    raw.beta_quantiles = np.sort(np.random.default_rng(1).normal(size=(3, 4)), axis=-1)
    table = prepare_lookup_table(raw, low_beta_pct=1.0)
    assert table.calibrated.tolist() == [True, False, True]
    assert table.has_beta_grid and table.low_beta_pct == 1.0
    assert torch.equal(table.beta_threshold, torch.from_numpy(raw.beta_quantiles[:, 1]).float())
    other = prepare_lookup_table(table, low_beta_pct=50.0)
    assert torch.equal(other.beta_threshold, torch.from_numpy(raw.beta_quantiles[:, 2]).float())
    assert prepare_lookup_table(table, low_beta_pct=1.0) is table
    raw.beta_quantiles[1, 1] = -9.0
    with pytest.raises(ValueError, match="beta_quantiles must be non-decreasing"):
        prepare_lookup_table(raw)


def test_table_is_frozen():
    table = prepare_lookup_table(_np_table())
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.surprise_pct = 1.0  # type: ignore[misc]
