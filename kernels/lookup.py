"""Public ``percentile_lookup``: validation + backend dispatch."""

from __future__ import annotations

from typing import Any

import torch

from surprise_monitor.kernels._backend import DEFAULT_BACKEND, Backend, fmt_shape, resolve_backend
from surprise_monitor.kernels._types import LookupResult, LookupTable
from surprise_monitor.kernels.defaults import (
    DEFAULT_EXPECTATION_PCT,
    DEFAULT_LOW_BETA_PCT,
    DEFAULT_SURPRISE_PCT,
)
from surprise_monitor.kernels.lookup_torch import percentile_lookup_torch
from surprise_monitor.kernels.table import prepare_lookup_table

__all__ = ["percentile_lookup"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _resolve_table(
    table: Any,
    surprise_pct: float | None,
    expectation_pct: float | None,
    low_beta_pct: float | None,
    device: torch.device,
) -> LookupTable:
    """``table`` ready for a lookup on ``device``: a prepared table is checked against the
    requested pcts and the device; anything else is prepared (and validated) here."""
    p = "percentile_lookup"
    if isinstance(table, LookupTable):
        for name, want, have in (
            ("surprise_pct", surprise_pct, table.surprise_pct),
            ("expectation_pct", expectation_pct, table.expectation_pct),
            ("low_beta_pct", low_beta_pct, table.low_beta_pct),
        ):
            if want is not None and have is not None and float(want) != have:
                raise ValueError(
                    f"{p}: table was prepared with {name}={have} but {name}={want} was "
                    "requested; call prepare_lookup_table again with the new pcts"
                )
        if table.device != device:
            raise ValueError(
                f"{p}: alpha is on {device} but the prepared table is on {table.device}"
            )
        return table
    return prepare_lookup_table(
        table,
        surprise_pct=DEFAULT_SURPRISE_PCT if surprise_pct is None else surprise_pct,
        expectation_pct=DEFAULT_EXPECTATION_PCT if expectation_pct is None else expectation_pct,
        low_beta_pct=DEFAULT_LOW_BETA_PCT if low_beta_pct is None else low_beta_pct,
        device=device,
    )


def _validate_shapes(alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable) -> None:
    """Raise ``ValueError`` for a bad alpha / classes type, dtype, shape or device (no sync)."""
    p = "percentile_lookup"
    if alpha.ndim != 2:
        raise ValueError(f"{p}: alpha must be 2-D [B, N], got {fmt_shape(alpha.shape)}")
    if not alpha.is_floating_point():
        raise ValueError(f"{p}: alpha must be floating point, got {alpha.dtype}")
    b, n = alpha.shape
    if n != table.num_filters:
        raise ValueError(f"{p}: alpha has N={n} filters but the table has N={table.num_filters}")
    if not isinstance(classes, torch.Tensor):
        raise ValueError(f"{p}: classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.dtype not in _INT_DTYPES:
        raise ValueError(f"{p}: classes must be an integer tensor, got {classes.dtype}")
    if classes.ndim != 1 or classes.shape[0] != b:
        raise ValueError(
            f"{p}: classes must be 1-D of length B={b}, got {fmt_shape(classes.shape)}"
        )
    if classes.device != alpha.device:
        raise ValueError(f"{p}: classes is on {classes.device} but alpha is on {alpha.device}")


def _validate_values(alpha: torch.Tensor, classes: torch.Tensor, table: LookupTable) -> None:
    """Raise ``ValueError`` for class ids out of range or non-finite alpha (one host sync)."""
    p = "percentile_lookup"
    if alpha.shape[0] == 0:
        return
    # one host sync for all data-dependent checks (matters on CUDA)
    lo, hi, bad = torch.stack(
        [classes.min().long(), classes.max().long(), (~torch.isfinite(alpha)).sum()]
    ).tolist()
    if lo < 0 or hi >= table.num_classes:
        raise ValueError(f"{p}: classes out of range [0, {table.num_classes}): min={lo}, max={hi}")
    if bad:
        raise ValueError(f"{p}: alpha has {bad} non-finite values")


@torch.no_grad()
def percentile_lookup(
    alpha: torch.Tensor,
    classes: torch.Tensor,
    table: Any,
    *,
    surprise_pct: float | None = None,
    expectation_pct: float | None = None,
    low_beta_pct: float | None = None,
    backend: Backend = DEFAULT_BACKEND,
    check_values: bool = True,
) -> LookupResult:
    """Percentile rank, surprise/expectation flags and beta (with its rank and the low-beta
    flag when the table has a beta grid) for a batch of alpha scores.

    Args:
        alpha: ``[B, N]`` float alpha scores (computed in float32).
        classes: ``[B]`` integer class per sample, ``0 <= c < K``, same device as alpha.
        table: a :class:`LookupTable` (fast path: used as is, must be on alpha's device) or
            any object with ``levels``, ``quantiles``, ``mean`` (prepared on alpha's device
            on every call; see :func:`prepare_lookup_table`).
        surprise_pct, expectation_pct, low_beta_pct: threshold levels. ``None`` means the
            prepared table's own pcts, or :mod:`.defaults`' for a raw table. Passing a value
            that differs from a prepared table's raises ``ValueError`` (re-prepare instead).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see
        :func:`surprise_monitor.kernels.grad_amap`).
        check_values: check that class ids are in range and alpha is finite, which reads the
            tensors on the host (one sync). ``False`` leaves those checks to a caller that
            guarantees them; shapes, dtypes and devices are always checked.

    Per sample ``b`` (class ``c``) and filter ``n``, with ``v = alpha[b, n]``, grid
    ``G = quantiles[c, n, :]`` and levels ``L``:

    * ``percentile``: 0 if ``v < G[0]``; 100 if ``v > G[Q-1]``; the **mid-rank on ties**:
      when ``v`` equals ``G[lo] = ... = G[hi]`` (``lo = #{G < v}``, ``hi = #{G <= v} - 1``),
      ``(L[lo] + L[hi]) / 2``; otherwise linear between the neighbours
      ``G[hi] < v < G[hi+1]``: ``L[hi] + (L[hi+1] - L[hi]) * (v - G[hi]) / (G[hi+1] - G[hi])``;
      clamped to [0, 100]. Equals ``numpy.interp(v, G, L)`` for strictly increasing G (see
      :func:`surprise_monitor.kernels.percentile_rank`).
    * ``surprise``: ``v > surprise_value[c, n]`` (strict) and class ``c`` calibrated.
    * ``expectation``: ``v < expectation_value[c, n]`` (strict), ``expectation_guard[c, n]``
      and class ``c`` calibrated.
    * ``beta[b]``: ``mean_n(alpha[b, n] - mean[c, n])``; with a beta grid, ``beta_percentile``
      its rank on ``beta_grid[c]`` (same convention) and ``low_beta``:
      ``beta < beta_threshold[c]`` and class ``c`` calibrated.

    Raises:
        ValueError: bad shapes/dtypes, class ids out of range, non-finite alpha, device or
            pct mismatch with a prepared table, invalid raw table, unusable backend.
    """
    if not isinstance(alpha, torch.Tensor):
        raise ValueError(
            f"percentile_lookup: alpha must be a torch.Tensor, got {type(alpha).__name__}"
        )
    prepared = _resolve_table(table, surprise_pct, expectation_pct, low_beta_pct, alpha.device)
    _validate_shapes(alpha, classes, prepared)
    if check_values:
        _validate_values(alpha, classes, prepared)
    if resolve_backend("percentile_lookup", backend, alpha.device) == "torch":
        return percentile_lookup_torch(alpha, classes, prepared)
    from surprise_monitor.kernels.lookup_triton import percentile_lookup_triton

    return percentile_lookup_triton(alpha, classes, prepared)
