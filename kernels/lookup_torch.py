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
    ids in ``[0, K)``. Runs on any device and never syncs with the host.
    """
    alpha = alpha.to(torch.float32).contiguous()
    cls = classes.long()
    grid = table.quantiles.index_select(0, cls)
    percentile = rank_on_grid(alpha, grid, table.levels)
    surprise = alpha > table.surprise_value.index_select(0, cls)
    expectation = (alpha < table.expectation_value.index_select(0, cls)) & (
        table.expectation_guard.index_select(0, cls)
    )
    beta = (alpha - table.mean.index_select(0, cls)).mean(dim=1)
    return LookupResult(percentile, surprise, expectation, beta)
