"""The prepared table and the result of :func:`surprise_monitor.kernels.percentile_lookup`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Threshold:
    """A per-(class, filter) threshold at a percent level of the grid.

    ``column`` is the grid level's index when ``pct`` is a grid level: the lookup then reads the
    threshold from the class's own grid row (exactly that column; nothing but the classes
    looked up is read). Otherwise ``values`` holds the ``[K, N]`` thresholds, interpolated once
    between the two neighbouring columns (see :func:`surprise_monitor.kernels.quantile_at`).
    """

    pct: float
    column: int | None
    values: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LookupTable:
    """A calibration table prepared for :func:`surprise_monitor.kernels.percentile_lookup`.

    Build it with :func:`surprise_monitor.kernels.prepare_lookup_table`; do not construct it by
    hand. All tensors live on one device; only ``quantiles`` may be non-contiguous.

    Attributes:
        levels: ``[Q]`` float32 percent levels, strictly increasing, ``0 .. 100``.
        quantiles: ``[K, N, Q]`` float32, any strides; ``quantiles[c, n, q]`` is the
            ``levels[q]``-th percentile of alpha for class ``c``, filter ``n`` (non-decreasing
            along ``q``). On the CPU it is the table's own tensor (class-major: a memory-mapped
            table pages in only the classes looked up); prepared for CUDA it is a level-major
            view (``[Q, K, N]`` contiguous: loads coalesce over filters).
        mean: ``[K, N]`` float32 per-class filter means (mu).
        class_mean: ``[K]`` float32, ``mean[c, :].mean()``: filter n of class c is eligible
            for expectation when ``mean[c, n] > class_mean[c]``.
        calibrated: ``[K]`` bool, the class had calibration images (all true for a table
            without ``counts``); no filter of an uncalibrated class is flagged.
        surprise: the surprise threshold (a grid column or ``[K, N]`` values).
        expectation: the expectation threshold.
        beta_levels: ``[Qb]`` float32 percent levels of the beta grid, or ``None``.
        beta_grid: ``[K, Qb]`` float32 percentiles of beta per class, or ``None``.
        beta_threshold: ``[K]`` float32, the ``low_beta_pct``-th percentile of beta, or ``None``.
        low_beta_pct: the percent level behind ``beta_threshold`` (``None`` without a beta grid).
    """

    levels: torch.Tensor
    quantiles: torch.Tensor
    mean: torch.Tensor
    class_mean: torch.Tensor
    calibrated: torch.Tensor
    surprise: Threshold
    expectation: Threshold
    beta_levels: torch.Tensor | None = None
    beta_grid: torch.Tensor | None = None
    beta_threshold: torch.Tensor | None = None
    low_beta_pct: float | None = None

    @property
    def surprise_pct(self) -> float:
        """The percent level of the surprise threshold."""
        return self.surprise.pct

    @property
    def expectation_pct(self) -> float:
        """The percent level of the expectation threshold."""
        return self.expectation.pct

    def threshold_values(self, threshold: Threshold) -> torch.Tensor:
        """``[K, N]`` values of a threshold (reads a whole grid column: for tests and
        inspection, not the lookup)."""
        if threshold.column is not None:
            return self.quantiles[..., threshold.column].contiguous()
        assert threshold.values is not None
        return threshold.values

    @property
    def surprise_value(self) -> torch.Tensor:
        """``[K, N]`` the ``surprise_pct``-th percentile values."""
        return self.threshold_values(self.surprise)

    @property
    def expectation_value(self) -> torch.Tensor:
        """``[K, N]`` the ``expectation_pct``-th percentile values."""
        return self.threshold_values(self.expectation)

    @property
    def expectation_guard(self) -> torch.Tensor:
        """``[K, N]`` bool, ``mean[c, n] > mean[c, :].mean()``."""
        return self.mean > self.class_mean[:, None]

    @property
    def has_beta_grid(self) -> bool:
        """True when the table ranks beta too (``beta_levels``, ``beta_grid``, threshold)."""
        return self.beta_grid is not None

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.quantiles.shape[0]

    @property
    def num_filters(self) -> int:
        """N, the number of filters."""
        return self.quantiles.shape[1]

    @property
    def num_levels(self) -> int:
        """Q, the number of grid levels."""
        return self.quantiles.shape[2]

    @property
    def device(self) -> torch.device:
        """The device all tensors live on."""
        return self.quantiles.device


@dataclass(frozen=True, eq=False)
class LookupResult:
    """Per-sample outputs of :func:`surprise_monitor.kernels.percentile_lookup`.

    Attributes:
        percentile: ``[B, N]`` float32 percentile rank of each alpha, in ``[0, 100]``
            (mid-rank on ties, see :func:`surprise_monitor.kernels.percentile_rank`).
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
