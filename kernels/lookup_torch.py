"""``percentile_lookup`` in plain PyTorch: the reference the Triton kernel is tested against,
and the production path on CPU (and wherever Triton is not used)."""

from __future__ import annotations

import torch

from kernels._types import LookupResult, LookupTable
from kernels.grid import rank_on_grid

__all__ = ["percentile_lookup_torch"]


@torch.no_grad()
def percentile_lookup_torch(
    alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable
) -> LookupResult:
    """:func:`kernels.percentile_lookup` on a prepared ``table``, without validation.

    ``alpha [B, N]`` (any float dtype, computed in float32), ``classes [B]`` integer class
    ids in ``[0, K)``. Runs on any device and never syncs with the host. Reads only the
    classes in ``classes`` from the level-major grid (``[Q, B, N]`` gathered, then ranked).
    """
    alpha = alpha.to(torch.float32).contiguous()
    cls = classes.long()
    grid = table.grid.index_select(1, cls).permute(1, 2, 0).contiguous()  # [B, N, Q]
    percentile = rank_on_grid(alpha, grid, table.levels)
    calibrated = table.calibrated.index_select(0, cls)
    surprise = (alpha > table.surprise_value.index_select(0, cls)) & calibrated[:, None]
    expectation = (
        (alpha < table.expectation_value.index_select(0, cls))
        & table.expectation_guard.index_select(0, cls)
        & calibrated[:, None]
    )
    beta = (alpha - table.mean.index_select(0, cls)).mean(dim=1)
    if not table.has_beta_grid:
        return LookupResult(percentile, surprise, expectation, beta, calibrated)
    beta_pct = rank_on_grid(beta, table.beta_grid.index_select(0, cls), table.beta_levels)
    low_beta = (beta < table.beta_threshold.index_select(0, cls)) & calibrated
    return LookupResult(percentile, surprise, expectation, beta, calibrated, beta_pct, low_beta)
