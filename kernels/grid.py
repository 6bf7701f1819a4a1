"""Percentile grids: the invariants of a grid, ranks on it and values read off it.

A grid is ``quantiles [..., Q]`` (non-decreasing along the last axis) at percent ``levels [Q]``
(strictly increasing, from 0 to 100). The calibration table holds two of them (alpha per
(class, filter), beta per class); :func:`check_percentile_grid` is the one statement of their
invariants, used by :func:`surprise_monitor.kernels.prepare_lookup_table` and by the table format.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

import torch

from surprise_monitor.kernels._backend import fmt_shape

__all__ = [
    "check_percentile_grid",
    "level_index",
    "percentile_rank",
    "quantile_at",
    "rank_on_grid",
]


_AXIS_LETTERS = {"class": "K", "filter": "N"}


def _check_levels(name: str, levels: torch.Tensor, where: str) -> None:
    """Raise ``ValueError`` unless ``levels`` is 1-D, finite, strictly increasing, 0 .. 100."""
    if levels.ndim != 1 or levels.shape[0] < 2:
        raise ValueError(
            f"{where}{name} must be 1-D with at least 2 entries, got {fmt_shape(levels.shape)}"
        )
    if not bool(torch.isfinite(levels).all()):
        raise ValueError(f"{where}{name} contain non-finite values")
    if not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(f"{where}{name} must be strictly increasing (in {levels.dtype})")
    lo, hi = float(levels[0]), float(levels[-1])
    if lo != 0.0 or hi != 100.0:
        raise ValueError(f"{where}{name} must start at 0 and end at 100, got {lo} .. {hi}")


def _first(mask: torch.Tensor, offset: int) -> list[int] | None:
    """The first index where ``mask`` is set (its first axis shifted by ``offset``), if any."""
    if not bool(mask.any()):
        return None
    first = [int(i) for i in mask.nonzero()[0]]
    first[0] += offset
    return first


def _all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN / Inf (a reduction: no temporary the size of ``t``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates; +-Inf shows in the extremes
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_values(
    names: tuple[str, str],
    quantiles: torch.Tensor,
    mean: torch.Tensor | None,
    axes: tuple[str, ...],
    where: str,
    chunk: int | None,
    after_chunk: Callable[[], None] | None,
) -> None:
    """Raise ``ValueError`` for non-finite quantiles or mean, or quantiles decreasing along the
    level axis (first found, with counts), reading ``chunk`` entries of the first axis at a
    time and calling ``after_chunk`` after each."""
    _, name = names
    rows = quantiles.shape[0]
    step = rows if chunk is None else max(1, int(chunk))
    bad_q = bad_m = steps = 0
    first = None
    for r0 in range(0, rows, step):
        part = quantiles[r0 : r0 + step]
        if not _all_finite(part):
            bad_q += int((~torch.isfinite(part)).sum())
        if mean is not None and not _all_finite(mean[r0 : r0 + step]):
            bad_m += int((~torch.isfinite(mean[r0 : r0 + step])).sum())
        dec = part[..., 1:] < part[..., :-1]
        if bool(dec.any()):
            steps += int(dec.sum())
            first = first or _first(dec, r0)
        del part, dec
        if after_chunk is not None:
            after_chunk()
    for what, bad in ((name, bad_q), ("mean", bad_m)):
        if bad:
            verb = "have" if what.endswith("s") else "has"
            raise ValueError(f"{where}{what} {verb} {bad} non-finite values (NaN or Inf)")
    if steps:
        assert first is not None
        at = ", ".join(f"{axis} {i}" for axis, i in zip((*axes, "level index"), first, strict=True))
        raise ValueError(
            f"{where}{name} must be non-decreasing along the level axis; {steps} steps "
            f"decrease, first at {at}"
        )


def check_percentile_grid(
    levels: torch.Tensor,
    quantiles: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    names: tuple[str, str] = ("levels", "quantiles"),
    axes: tuple[str, ...] = ("class", "filter"),
    where: str = "",
    values: bool = True,
    chunk: int | None = None,
    after_chunk: Callable[[], None] | None = None,
) -> None:
    """Check a percentile grid and raise ``ValueError`` naming the first broken invariant.

    ``levels [Q]``: finite, strictly increasing (in its own dtype), from 0 to 100.
    ``quantiles [*axes, Q]``: one entry per axis in ``axes`` plus the level axis, every size at
    least 1, finite, non-decreasing along the level axis. ``mean`` (optional): shaped like
    ``quantiles`` without the level axis, finite. ``names`` are the two grid tensors' names in
    the messages, and ``where`` prefixes every message. ``values=False`` checks the levels and
    the shapes only, without reading ``quantiles`` and ``mean`` (for a grid whose values were
    checked when it was made or loaded: a memory-mapped table is not paged in). ``chunk``:
    read the values ``chunk`` entries of the first axis at a time (bounded working memory),
    calling ``after_chunk`` after each (a memory-mapped table drops the pages it read).
    """
    levels_name, name = names
    _check_levels(levels_name, levels, where)
    q = levels.shape[0]
    if quantiles.ndim != len(axes) + 1 or quantiles.shape[-1] != q:
        shape = "[" + ", ".join([_AXIS_LETTERS.get(a, a) for a in axes] + ["Q"]) + "]"
        raise ValueError(
            f"{where}{name} must be {shape} with Q={q} (len(levels)), "
            f"got {fmt_shape(quantiles.shape)}"
        )
    if min(quantiles.shape[:-1], default=1) < 1:
        raise ValueError(
            f"{where}{name} must have K >= 1 and N >= 1, got {fmt_shape(quantiles.shape)}"
        )
    if mean is not None and tuple(mean.shape) != tuple(quantiles.shape[:-1]):
        raise ValueError(
            f"{where}mean must be [K, N] = {fmt_shape(quantiles.shape[:-1])}, "
            f"got {fmt_shape(mean.shape)}"
        )
    if values:
        _check_values(names, quantiles, mean, axes, where, chunk, after_chunk)


def rank_on_grid(values: torch.Tensor, grid: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Percentile rank of contiguous ``values [...]`` on contiguous ``grid [..., Q]`` (same dtype;
    see :func:`percentile_rank` for the convention, mid-rank on ties). No validation, no host
    sync."""
    q = grid.shape[-1]
    v = values.unsqueeze(-1)
    below = torch.searchsorted(grid, v).squeeze(-1)  # #{G < v}
    upto = torch.searchsorted(grid, v, right=True).squeeze(-1)  # #{G <= v}
    lo = (upto - 1).clamp_(min=0)  # the last G <= v
    hi = upto.clamp(max=q - 1)  # the first G > v
    g_lo = grid.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    g_hi = grid.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    l_lo = levels.take(lo)
    l_hi = levels.take(hi)
    frac = (values - g_lo) / (g_hi - g_lo)
    rank = l_lo + (l_hi - l_lo) * frac
    mid = (levels.take(below.clamp(max=q - 1)) + l_lo) * 0.5  # v = G[below] = ... = G[lo]
    rank = torch.where(upto > below, mid, rank)
    rank = torch.where(upto == 0, 0.0, rank)
    rank = torch.where(below == q, 100.0, rank)
    return rank.clamp_(0.0, 100.0)


@torch.no_grad()
def percentile_rank(
    values: torch.Tensor, quantiles: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Percentile rank of ``values [...]`` on the grid ``quantiles [..., Q]`` at ``levels [Q]``.

    ``values`` and ``quantiles[..., 0]`` broadcast against each other. Convention (grid ``G``
    non-decreasing, levels ``L`` running from 0 to 100), with ``lo = #{q: G[q] < v}`` and
    ``hi = #{q: G[q] <= v} - 1``:

    * ``v < G[0]`` gives 0 and ``v > G[Q-1]`` gives 100;
    * **mid-rank on ties**: when ``v`` equals grid values (``G[lo] = ... = G[hi] = v``, a flat
      run of the grid or a single grid point), ``rank = (L[lo] + L[hi]) / 2``. A ReLU'd filter
      that is 0 for 60% of a class has a flat run of zeros up to its 60th percentile: alpha = 0
      ranks about 30, not 0 or 60;
    * otherwise ``G[hi] < v < G[hi+1]`` and the rank is linear between them::

        rank = L[hi] + (L[hi+1] - L[hi]) * (v - G[hi]) / (G[hi+1] - G[hi])

    clamped to ``[0, 100]``. For a strictly increasing grid this is ``numpy.interp(v, G, L)``;
    on ties it is the mean of the left- and right-continuous ranks. The Triton lookup kernel
    follows the same convention. Returns float32 (the grid's dtype).
    """
    shape = torch.broadcast_shapes(values.shape, quantiles.shape[:-1])
    grid = quantiles.expand(*shape, quantiles.shape[-1]).contiguous()
    v = values.to(grid.dtype).expand(shape).contiguous()
    return rank_on_grid(v, grid, levels.to(grid.dtype))


def level_index(levels: torch.Tensor, pct: float) -> tuple[int, float]:
    """Where ``pct`` lies on the grid: ``(j, w)`` with ``L[j] <= pct < L[j+1]`` and
    ``w = (pct - L[j]) / (L[j+1] - L[j])``; ``w == 0`` exactly when ``pct`` is a grid level
    (compared in float32). Raises ``ValueError`` if ``pct`` lies outside ``[L[0], L[-1]]``."""
    lv = levels.detach().to("cpu", torch.float32).tolist()
    p = float(torch.tensor(float(pct), dtype=torch.float32))
    if not lv[0] <= p <= lv[-1]:
        raise ValueError(f"quantile_at: pct={pct} is outside the grid [{lv[0]}, {lv[-1]}]")
    j = bisect_right(lv, p) - 1
    if lv[j] == p:
        return j, 0.0
    return j, (p - lv[j]) / (lv[j + 1] - lv[j])


@torch.no_grad()
def quantile_at(quantiles: torch.Tensor, levels: torch.Tensor, pct: float) -> torch.Tensor:
    """Value of the ``pct``-th percentile read off the grid ``quantiles [..., Q]``.

    If ``pct`` equals a grid level (compared in float32) the result is exactly that grid
    column. Between two grid levels ``L[j] < pct < L[j+1]`` it interpolates linearly in
    level: ``G[j] + (G[j+1] - G[j]) * (pct - L[j]) / (L[j+1] - L[j])``. Raises
    ``ValueError`` if ``pct`` lies outside ``[levels[0], levels[-1]]``.
    """
    j, w = level_index(levels, pct)
    if w == 0.0:
        return quantiles[..., j].contiguous()
    lo = quantiles[..., j]
    return lo + (quantiles[..., j + 1] - lo) * w
