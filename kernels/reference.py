"""Pure-PyTorch reference implementations (also the production path on CPU).

Everything here works on any device and is what ``backend="torch"`` runs. The Triton
kernels in ``_triton_*.py`` are tested against these functions.
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from kernels._types import LookupResult, LookupTable

__all__ = [
    "grad_amap_reference",
    "percentile_lookup_reference",
    "percentile_rank",
    "quantile_at",
]

# Elements per chunk of the CPU grad_amap loop (4 MB of float32): bigger inputs are processed
# in batch chunks reusing one cache-sized temporary instead of materialising the whole
# [B, N, H, W] product (several times faster once that product spills out of cache).
_CHUNK_ELEMS = 1 << 20


@torch.no_grad()
def grad_amap_reference(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``alpha[b, n] = mean_{h,w}(activation * gradient)`` as float32 ``[B, N]``.

    Inputs are ``[B, N, H, W]`` of any float dtype and layout; half-precision inputs are
    upcast to float32 before the product, so accumulation is float32. On CPU, inputs larger
    than ``_CHUNK_ELEMS`` are processed in batch chunks reusing one temporary buffer.
    """
    b, n, h, w = activation.shape
    hw = h * w
    upcast = activation.dtype != torch.float32 or gradient.dtype != torch.float32
    per_sample = max(1, n * hw)
    if activation.device.type != "cpu" or b * per_sample <= _CHUNK_ELEMS:
        a, g = (activation.float(), gradient.float()) if upcast else (activation, gradient)
        return (a * g).mean(dim=(2, 3))
    out = torch.empty((b, n), dtype=torch.float32, device=activation.device)
    step = max(1, _CHUNK_ELEMS // per_sample)
    buf: torch.Tensor | None = None
    for start in range(0, b, step):
        a = activation[start : start + step]
        g = gradient[start : start + step]
        if upcast:
            a, g = a.float(), g.float()
        if buf is None:
            buf = torch.empty_like(a)
        prod = buf[: a.shape[0]]
        torch.mul(a, g, out=prod)
        torch.sum(prod, dim=(2, 3), out=out[start : start + step])
    return out.div_(hw)


def _rank_on_grid(values: torch.Tensor, grid: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Percentile rank of contiguous ``values [...]`` on contiguous ``grid [..., Q]``."""
    q = grid.shape[-1]
    count = torch.searchsorted(grid, values.unsqueeze(-1), right=True).squeeze(-1)
    lo = (count - 1).clamp_(min=0)
    hi = count.clamp(max=q - 1)
    g_lo = grid.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    g_hi = grid.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    l_lo = levels.take(lo)
    l_hi = levels.take(hi)
    frac = (values - g_lo) / (g_hi - g_lo)
    rank = l_lo + (l_hi - l_lo) * frac
    rank = torch.where(count == 0, 0.0, rank)
    rank = torch.where(count == q, 100.0, rank)
    return rank.clamp_(0.0, 100.0)


@torch.no_grad()
def percentile_rank(
    values: torch.Tensor, quantiles: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Percentile rank of ``values [...]`` on the grid ``quantiles [..., Q]`` at ``levels [Q]``.

    ``values`` and ``quantiles[..., 0]`` broadcast against each other. Convention
    (right-continuous, well defined on ties / flat runs of the grid ``G``, levels ``L``
    running from 0 to 100): ``v < G[0]`` gives 0; ``v >= G[Q-1]`` gives 100; otherwise,
    with ``q`` the *last* index such that ``G[q] <= v`` (so ``G[q] < G[q+1]``)::

        rank = L[q] + (L[q+1] - L[q]) * (v - G[q]) / (G[q+1] - G[q])

    clamped to ``[0, 100]``. For a strictly increasing grid this is ``numpy.interp(v, G, L)``.
    Returns float32 (the grid's dtype).
    """
    shape = torch.broadcast_shapes(values.shape, quantiles.shape[:-1])
    grid = quantiles.expand(*shape, quantiles.shape[-1]).contiguous()
    v = values.to(grid.dtype).expand(shape).contiguous()
    return _rank_on_grid(v, grid, levels.to(grid.dtype))


@torch.no_grad()
def quantile_at(quantiles: torch.Tensor, levels: torch.Tensor, pct: float) -> torch.Tensor:
    """Value of the ``pct``-th percentile read off the grid ``quantiles [..., Q]``.

    If ``pct`` equals a grid level (compared in float32) the result is exactly that grid
    column. Between two grid levels ``L[j] < pct < L[j+1]`` it interpolates linearly in
    level: ``G[j] + (G[j+1] - G[j]) * (pct - L[j]) / (L[j+1] - L[j])``. Raises
    ``ValueError`` if ``pct`` lies outside ``[levels[0], levels[-1]]``.
    """
    lv = levels.detach().to("cpu", torch.float32).tolist()
    p = float(torch.tensor(float(pct), dtype=torch.float32))
    if not lv[0] <= p <= lv[-1]:
        raise ValueError(f"quantile_at: pct={pct} is outside the grid [{lv[0]}, {lv[-1]}]")
    j = bisect_right(lv, p) - 1
    if lv[j] == p:
        return quantiles[..., j].contiguous()
    w = (p - lv[j]) / (lv[j + 1] - lv[j])
    lo = quantiles[..., j]
    return lo + (quantiles[..., j + 1] - lo) * w


@torch.no_grad()
def percentile_lookup_reference(
    alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable
) -> LookupResult:
    """Reference for :func:`kernels.percentile_lookup` on a prepared ``table``.

    ``alpha [B, N]`` (any float dtype, computed in float32), ``classes [B]`` integer class
    ids in ``[0, K)``; no validation is done here.
    """
    alpha = alpha.to(torch.float32).contiguous()
    cls = classes.long()
    grid = table.quantiles.index_select(0, cls)
    percentile = _rank_on_grid(alpha, grid, table.levels)
    surprise = alpha > table.surprise_value.index_select(0, cls)
    expectation = (alpha < table.expectation_value.index_select(0, cls)) & (
        table.expectation_guard.index_select(0, cls)
    )
    beta = (alpha - table.mean.index_select(0, cls)).mean(dim=1)
    return LookupResult(percentile, surprise, expectation, beta)
