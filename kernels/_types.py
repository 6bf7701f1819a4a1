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
        quantiles: ``[K, N, Q]`` float32; ``quantiles[c, n, q]`` is the ``levels[q]``-th
            percentile of alpha for class ``c``, filter ``n`` (non-decreasing along ``q``).
        mean: ``[K, N]`` float32 per-class filter means (mu).
        surprise_value: ``[K, N]`` float32, the ``surprise_pct``-th percentile value.
        expectation_value: ``[K, N]`` float32, the ``expectation_pct``-th percentile value.
        expectation_guard: ``[K, N]`` bool, ``mean[c, n] > mean[c, :].mean()``.
        surprise_pct: the percent level behind ``surprise_value``.
        expectation_pct: the percent level behind ``expectation_value``.
    """

    levels: torch.Tensor
    quantiles: torch.Tensor
    mean: torch.Tensor
    surprise_value: torch.Tensor
    expectation_value: torch.Tensor
    expectation_guard: torch.Tensor
    surprise_pct: float
    expectation_pct: float

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
    """Per-sample outputs of :func:`kernels.percentile_lookup`.

    Attributes:
        percentile: ``[B, N]`` float32 percentile rank of each alpha, in ``[0, 100]``.
        surprise: ``[B, N]`` bool, alpha strictly above the class's surprise value.
        expectation: ``[B, N]`` bool, alpha strictly below the expectation value and the
            filter's expectation guard set.
        beta: ``[B]`` float32, ``mean_n(alpha[b, n] - mean[c, n])``.
    """

    percentile: torch.Tensor
    surprise: torch.Tensor
    expectation: torch.Tensor
    beta: torch.Tensor
