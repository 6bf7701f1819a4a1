"""The prepared table and the result of :func:`kernels.percentile_lookup`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LookupTable:
    """A calibration table prepared for :func:`kernels.percentile_lookup`.

    All tensors are contiguous and live on one device. Build it with
    :func:`kernels.prepare_lookup_table`; do not construct it by hand.

    Attributes:
        levels: ``[Q]`` float32 percent levels, strictly increasing, ``0 .. 100``.
        grid: ``[Q, K, N]`` float32, level-major: ``grid[q, c, n]`` is the ``levels[q]``-th
            percentile of alpha for class ``c``, filter ``n`` (non-decreasing along ``q``).
            Level-major keeps a class's grid in Q runs of N contiguous values (coalesced loads
            over filters on a GPU; a memory-mapped table pages in only the classes it sees).
        mean: ``[K, N]`` float32 per-class filter means (mu).
        surprise_value: ``[K, N]`` float32, the ``surprise_pct``-th percentile value.
        expectation_value: ``[K, N]`` float32, the ``expectation_pct``-th percentile value.
        expectation_guard: ``[K, N]`` bool, ``mean[c, n] > mean[c, :].mean()``.
        calibrated: ``[K]`` bool, the class had calibration images (all true for a table
            without ``counts``); no filter of an uncalibrated class is flagged.
        surprise_pct: the percent level behind ``surprise_value``.
        expectation_pct: the percent level behind ``expectation_value``.
        beta_levels: ``[Qb]`` float32 percent levels of the beta grid, or ``None``.
        beta_grid: ``[K, Qb]`` float32 percentiles of beta per class, or ``None``.
        beta_threshold: ``[K]`` float32, the ``low_beta_pct``-th percentile of beta, or ``None``.
        low_beta_pct: the percent level behind ``beta_threshold`` (``None`` without a beta grid).
    """

    levels: torch.Tensor
    grid: torch.Tensor
    mean: torch.Tensor
    surprise_value: torch.Tensor
    expectation_value: torch.Tensor
    expectation_guard: torch.Tensor
    calibrated: torch.Tensor
    surprise_pct: float
    expectation_pct: float
    beta_levels: torch.Tensor | None = None
    beta_grid: torch.Tensor | None = None
    beta_threshold: torch.Tensor | None = None
    low_beta_pct: float | None = None

    @property
    def quantiles(self) -> torch.Tensor:
        """``[K, N, Q]`` view of :attr:`grid` (no copy): ``quantiles[c, n, q]``."""
        return self.grid.permute(1, 2, 0)

    @property
    def has_beta_grid(self) -> bool:
        """True when the table ranks beta too (``beta_levels``, ``beta_grid``, threshold)."""
        return self.beta_grid is not None

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.grid.shape[1]

    @property
    def num_filters(self) -> int:
        """N, the number of filters."""
        return self.grid.shape[2]

    @property
    def num_levels(self) -> int:
        """Q, the number of grid levels."""
        return self.grid.shape[0]

    @property
    def device(self) -> torch.device:
        """The device all tensors live on."""
        return self.grid.device


@dataclass(frozen=True, eq=False)
class LookupResult:
    """Per-sample outputs of :func:`kernels.percentile_lookup`.

    Attributes:
        percentile: ``[B, N]`` float32 percentile rank of each alpha, in ``[0, 100]``
            (mid-rank on ties, see :func:`kernels.percentile_rank`).
        surprise: ``[B, N]`` bool, alpha strictly above the class's surprise value (and the
            class calibrated).
        expectation: ``[B, N]`` bool, alpha strictly below the expectation value, the
            filter's expectation guard set (and the class calibrated).
        beta: ``[B]`` float32, ``mean_n(alpha[b, n] - mean[c, n])``.
        calibrated: ``[B]`` bool, the sample's class had calibration images.
        beta_percentile: ``[B]`` float32 rank of beta on the class's beta grid (same
            convention), or ``None`` when the table has no beta grid.
        low_beta: ``[B]`` bool, beta strictly below the class's ``beta_threshold`` (and the
            class calibrated), or ``None`` when the table has no beta grid.
    """

    percentile: torch.Tensor
    surprise: torch.Tensor
    expectation: torch.Tensor
    beta: torch.Tensor
    calibrated: torch.Tensor
    beta_percentile: torch.Tensor | None = None
    low_beta: torch.Tensor | None = None
