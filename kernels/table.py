"""Validation and preparation of calibration tables for
:func:`surprise_monitor.kernels.percentile_lookup`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from surprise_monitor.kernels._types import LookupTable, Threshold
from surprise_monitor.kernels.defaults import (
    DEFAULT_EXPECTATION_PCT,
    DEFAULT_LOW_BETA_PCT,
    DEFAULT_SURPRISE_PCT,
)
from surprise_monitor.kernels.grid import check_percentile_grid, level_index, quantile_at

__all__ = ["prepare_lookup_table"]

_WHERE = "prepare_lookup_table: "


def _as_f32(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """``x`` (a tensor or array) as a contiguous float32 tensor on ``device`` (no copy when it
    already is one)."""
    if x is None:
        raise ValueError(f"{_WHERE}table has no '{name}'")
    t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{_WHERE}{name} must be numeric, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _grid_on(quantiles: Any, device: torch.device) -> torch.Tensor:
    """``quantiles [K, N, Q]`` as float32 on ``device``: on the CPU the tensor itself when it
    already is one (a memory-mapped table is not read here); on CUDA a level-major copy (a
    ``[K, N, Q]`` view of a contiguous ``[Q, K, N]`` tensor: the lookup's loads coalesce over
    filters)."""
    if quantiles is None:
        raise ValueError(f"{_WHERE}table has no 'quantiles'")
    t = torch.as_tensor(quantiles)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{_WHERE}quantiles must be numeric, got dtype {t.dtype}")
    t = t.to(device=device, dtype=torch.float32)
    if device.type == "cuda" and t.ndim == 3 and not t.permute(2, 0, 1).is_contiguous():
        t = t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return t


def _check_pct(name: str, pct: float) -> float:
    """``pct`` as a float, or ``ValueError`` when it is outside [0, 100]."""
    pct = float(pct)
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"{_WHERE}{name}={pct} is outside [0, 100]")
    return pct


@dataclasses.dataclass(frozen=True)
class _Pcts:
    """The three threshold levels a table is prepared for."""

    surprise: float
    expectation: float
    low_beta: float


def _threshold(quantiles: torch.Tensor, levels: torch.Tensor, pct: float) -> Threshold:
    """The threshold at ``pct``: a grid column (read per class by the lookup) when ``pct`` is
    a grid level, else the ``[K, N]`` values interpolated between two columns."""
    column, weight = level_index(levels, pct)
    if weight == 0.0:
        return Threshold(pct, column, None)
    return Threshold(pct, None, quantile_at(quantiles, levels, pct).contiguous())


def _thresholds(
    levels: torch.Tensor,
    quantiles: torch.Tensor,
    mean: torch.Tensor,
    calibrated: torch.Tensor,
    beta: tuple[torch.Tensor, torch.Tensor] | None,
    pcts: _Pcts,
) -> LookupTable:
    """The :class:`LookupTable` of a validated grid (reading no grid column at a grid level)."""
    beta_levels, beta_grid = beta if beta is not None else (None, None)
    return LookupTable(
        levels=levels,
        quantiles=quantiles,
        mean=mean,
        class_mean=mean.mean(dim=1).contiguous(),
        calibrated=calibrated,
        surprise=_threshold(quantiles, levels, pcts.surprise),
        expectation=_threshold(quantiles, levels, pcts.expectation),
        beta_levels=beta_levels,
        beta_grid=beta_grid,
        beta_threshold=(
            None
            if beta is None
            else quantile_at(beta_grid, beta_levels, pcts.low_beta).contiguous()
        ),
        low_beta_pct=None if beta is None else pcts.low_beta,
    )


def _rederive(table: LookupTable, device: torch.device | None, pcts: _Pcts) -> LookupTable:
    """A prepared table moved to ``device`` and/or re-derived for other pcts."""
    if device is not None and torch.device(device) != table.device:
        device = torch.device(device)
        moved = {
            f.name: getattr(table, f.name).to(device)
            for f in dataclasses.fields(table)
            if isinstance(getattr(table, f.name), torch.Tensor) and f.name != "quantiles"
        }
        moved["quantiles"] = _grid_on(table.quantiles, device)
        for name in ("surprise", "expectation"):
            th = getattr(table, name)
            values = None if th.values is None else th.values.to(device)
            moved[name] = dataclasses.replace(th, values=values)
        table = dataclasses.replace(table, **moved)
    same = (table.surprise_pct, table.expectation_pct) == (pcts.surprise, pcts.expectation)
    if same and (not table.has_beta_grid or table.low_beta_pct == pcts.low_beta):
        return table
    beta = (table.beta_levels, table.beta_grid) if table.has_beta_grid else None
    return _thresholds(table.levels, table.quantiles, table.mean, table.calibrated, beta, pcts)


def _beta_grid(
    table: Any, device: torch.device, check_values: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The table's ``beta_levels [Qb]`` and ``beta_quantiles [K, Qb]`` (float32, checked), or
    ``None`` when it has none."""
    if getattr(table, "beta_quantiles", None) is None:
        return None
    beta_levels = _as_f32(getattr(table, "beta_levels", None), "beta_levels", device)
    beta_grid = _as_f32(table.beta_quantiles, "beta_quantiles", device)
    check_percentile_grid(
        beta_levels, beta_grid, names=("beta_levels", "beta_quantiles"), axes=("class",),
        where=_WHERE, values=check_values,
    )  # fmt: skip
    return beta_levels, beta_grid


def prepare_lookup_table(
    table: Any,
    *,
    surprise_pct: float = DEFAULT_SURPRISE_PCT,
    expectation_pct: float = DEFAULT_EXPECTATION_PCT,
    low_beta_pct: float = DEFAULT_LOW_BETA_PCT,
    device: torch.device | str | None = None,
) -> LookupTable:
    """Validate a calibration table and precompute per-(class, filter) thresholds.

    Args:
        table: any object with ``levels [Q]``, ``quantiles [K, N, Q]`` and ``mean [K, N]`` (torch
            tensors or numpy arrays) and optionally ``counts [K]`` (classes with 0 images are not
            flagged) and ``beta_levels [Qb]`` / ``beta_quantiles [K, Qb]`` (the lookup then ranks
            beta and flags low beta too); or an existing :class:`LookupTable` (returned as is when
            pcts and device already match, else re-derived / moved). An object with ``grid_checked =
            True`` (a loaded :class:`surprise_monitor.monitor.CalibrationTable`) vouches for its
            grid values: only the levels and shapes are checked, so a memory-mapped table is not
            read here.
        surprise_pct: percent level of the surprise threshold (:mod:`.defaults`).
        expectation_pct: percent level of the expectation threshold.
        low_beta_pct: percent level of the low-beta threshold (default 1; used only with a
            beta grid).
        device: target device; ``None`` keeps the device of ``table.quantiles``.

    The threshold at a pct equal to a grid level is exactly that grid column, read by the
    lookup from the rows of the classes it looks up (on the CPU the grid is used in place:
    nothing is copied, and a memory-mapped table keeps unused classes on disk); between two
    levels it is interpolated linearly in level between the two neighbouring columns (see
    :func:`surprise_monitor.kernels.quantile_at`), once, here. ``expectation_guard = mean[c, n] >
    mean[c, :].mean()``. On CUDA the grid is copied level-major (coalesced loads).

    Raises:
        ValueError: levels not strictly increasing or not spanning 0..100, inconsistent
            shapes, pcts outside [0, 100], non-finite or decreasing quantiles.
    """
    pcts = _Pcts(
        _check_pct("surprise_pct", surprise_pct),
        _check_pct("expectation_pct", expectation_pct),
        _check_pct("low_beta_pct", low_beta_pct),
    )
    if isinstance(table, LookupTable):
        return _rederive(table, device, pcts)
    if device is None:
        q_attr = getattr(table, "quantiles", None)
        device = q_attr.device if isinstance(q_attr, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    check_values = not getattr(table, "grid_checked", False)
    levels = _as_f32(getattr(table, "levels", None), "levels", device)
    quantiles = _grid_on(getattr(table, "quantiles", None), device)
    mean = _as_f32(getattr(table, "mean", None), "mean", device)
    check_percentile_grid(levels, quantiles, mean, where=_WHERE, values=check_values)
    k = quantiles.shape[0]
    counts = getattr(table, "counts", None)
    if counts is None:
        calibrated = torch.ones(k, dtype=torch.bool, device=device)
    else:
        calibrated = (torch.as_tensor(counts).to(device) > 0).contiguous()
        if tuple(calibrated.shape) != (k,):
            raise ValueError(f"{_WHERE}counts must be [K] = ({k},)")
    beta = _beta_grid(table, device, check_values)
    return _thresholds(levels, quantiles, mean, calibrated, beta, pcts)
