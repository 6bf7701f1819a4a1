"""``percentile_lookup`` in plain PyTorch: the reference the Triton kernel is tested against,
and the production path on CPU (and wherever Triton is not used)."""

from __future__ import annotations

import torch

from surprise_monitor.kernels._types import LookupResult, LookupTable, Threshold
from surprise_monitor.kernels.grid import rank_on_grid

__all__ = ["percentile_lookup_torch"]


def _per_sample(threshold: Threshold, rows: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` thresholds of the samples: a column of their grid ``rows [B, N, Q]``, or the
    precomputed values of their classes."""
    if threshold.column is not None:
        return rows[..., threshold.column]
    assert threshold.values is not None
    return threshold.values.index_select(0, cls)


@torch.no_grad()
def percentile_lookup_torch(
    alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable
) -> LookupResult:
    """:func:`surprise_monitor.kernels.percentile_lookup` on a prepared ``table``, without
    validation.

    ``alpha [B, N]`` (any float dtype, computed in float32), ``classes [B]`` integer class
    ids in ``[0, K)``. Runs on any device and never syncs with the host. Reads the grid rows
    of the classes in ``classes`` only (thresholds at grid levels included).
    """
    alpha = alpha.to(torch.float32).contiguous()
    cls = classes.long()
    rows = table.quantiles.index_select(0, cls)  # [B, N, Q], contiguous
    percentile = rank_on_grid(alpha, rows, table.levels)
    calibrated = table.calibrated.index_select(0, cls)
    mu = table.mean.index_select(0, cls)
    surprise = (alpha > _per_sample(table.surprise, rows, cls)) & calibrated[:, None]
    expectation = (
        (alpha < _per_sample(table.expectation, rows, cls))
        & (mu > table.class_mean.index_select(0, cls)[:, None])
        & calibrated[:, None]
    )
    beta = (alpha - mu).mean(dim=1)
    if not table.has_beta_grid:
        return LookupResult(percentile, surprise, expectation, beta, calibrated)
    beta_pct = rank_on_grid(beta, table.beta_grid.index_select(0, cls), table.beta_levels)
    low_beta = (beta < table.beta_threshold.index_select(0, cls)) & calibrated
    return LookupResult(percentile, surprise, expectation, beta, calibrated, beta_pct, low_beta)
