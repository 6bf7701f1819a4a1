"""prepare_lookup_table: conversion, pass-through and re-derivation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernels import LookupTable, prepare_lookup_table


def _np_table():
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        levels=np.array([0, 0.1, 50, 99.9, 100], dtype=np.float64),
        quantiles=np.sort(rng.normal(size=(3, 4, 5)), axis=-1),
        mean=rng.normal(size=(3, 4)),
    )


def test_numpy_and_torch_inputs_give_the_same_contiguous_float32_table():
    raw = _np_table()
    a = prepare_lookup_table(raw)
    b = prepare_lookup_table(
        SimpleNamespace(**{k: torch.from_numpy(v) for k, v in vars(raw).items()})
    )
    assert isinstance(a, LookupTable)
    assert (a.num_classes, a.num_filters, a.num_levels) == (3, 4, 5)
    assert a.device == torch.device("cpu")
    for name in ("levels", "quantiles", "mean", "surprise_value", "expectation_value"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == torch.float32 and ta.is_contiguous()
        assert torch.equal(ta, tb), name
    assert a.expectation_guard.dtype == torch.bool and a.expectation_guard.is_contiguous()
    assert torch.equal(a.expectation_guard, b.expectation_guard)
    assert (a.surprise_pct, a.expectation_pct) == (99.9, 0.1)
    q = torch.from_numpy(raw.quantiles).float()
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


def test_table_is_frozen():
    table = prepare_lookup_table(_np_table())
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.surprise_pct = 1.0  # type: ignore[misc]
