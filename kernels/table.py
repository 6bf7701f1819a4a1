"""Validation and preparation of calibration tables for :func:`kernels.percentile_lookup`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kernels._types import LookupTable
from kernels.grid import check_percentile_grid, quantile_at

__all__ = ["prepare_lookup_table"]


def _as_f32(x: Any, name: str, device: torch.device | None) -> torch.Tensor:
    """``x`` (a tensor or array) as a contiguous float32 tensor on ``device``."""
    if x is None:
        raise ValueError(f"prepare_lookup_table: table has no '{name}'")
    t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"prepare_lookup_table: {name} must be numeric, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _check_pct(name: str, pct: float) -> float:
    """``pct`` as a float, or ``ValueError`` when it is outside [0, 100]."""
    pct = float(pct)
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"prepare_lookup_table: {name}={pct} is outside [0, 100]")
    return pct


def _thresholds(
    levels: torch.Tensor,
    quantiles: torch.Tensor,
    mean: torch.Tensor,
    surprise_pct: float,
    expectation_pct: float,
) -> LookupTable:
    """The :class:`LookupTable` of a validated grid: thresholds and guard precomputed."""
    return LookupTable(
        levels=levels,
        quantiles=quantiles,
        mean=mean,
        surprise_value=quantile_at(quantiles, levels, surprise_pct).contiguous(),
        expectation_value=quantile_at(quantiles, levels, expectation_pct).contiguous(),
        expectation_guard=(mean > mean.mean(dim=1, keepdim=True)).contiguous(),
        surprise_pct=surprise_pct,
        expectation_pct=expectation_pct,
    )


def prepare_lookup_table(
    table: Any,
    *,
    surprise_pct: float = 99.9,
    expectation_pct: float = 0.1,
    device: torch.device | str | None = None,
) -> LookupTable:
    """Validate a calibration table and precompute per-(class, filter) thresholds.

    Args:
        table: any object with ``levels [Q]``, ``quantiles [K, N, Q]`` and ``mean [K, N]``
            (torch tensors or numpy arrays), or an existing :class:`LookupTable` (returned
            as is when pcts and device already match, else re-derived / moved).
        surprise_pct: percent level of the surprise threshold (default 99.9).
        expectation_pct: percent level of the expectation threshold (default 0.1).
        device: target device; ``None`` keeps the device of ``table.quantiles``.

    The threshold at a pct equal to a grid level is exactly that grid column; between two
    levels it is interpolated linearly in level between the two neighbouring columns (see
    :func:`kernels.quantile_at`). ``expectation_guard = mean[c, n] > mean[c, :].mean()``.

    Raises:
        ValueError: levels not strictly increasing or not spanning 0..100, inconsistent
            shapes, pcts outside [0, 100], non-finite or decreasing quantiles.
    """
    surprise_pct = _check_pct("surprise_pct", surprise_pct)
    expectation_pct = _check_pct("expectation_pct", expectation_pct)
    if isinstance(table, LookupTable):
        if device is not None and torch.device(device) != table.device:
            moved = {
                f.name: getattr(table, f.name).to(device)
                for f in dataclasses.fields(table)
                if isinstance(getattr(table, f.name), torch.Tensor)
            }
            table = dataclasses.replace(table, **moved)
        if (table.surprise_pct, table.expectation_pct) == (surprise_pct, expectation_pct):
            return table
        return _thresholds(table.levels, table.quantiles, table.mean, surprise_pct, expectation_pct)

    if device is None:
        q_attr = getattr(table, "quantiles", None)
        device = q_attr.device if isinstance(q_attr, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    levels = _as_f32(getattr(table, "levels", None), "levels", device)
    quantiles = _as_f32(getattr(table, "quantiles", None), "quantiles", device)
    mean = _as_f32(getattr(table, "mean", None), "mean", device)
    check_percentile_grid(levels, quantiles, mean, where="prepare_lookup_table: ")
    return _thresholds(levels, quantiles, mean, surprise_pct, expectation_pct)
