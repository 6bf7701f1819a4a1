"""Per-class statistics against numpy on the same values, with and without blocking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.calibrate.options import RunOptions
from surprise_monitor.calibrate.statistics import class_statistics, sorted_block_statistics
from surprise_monitor.monitor.table import DEFAULT_BETA_LEVELS, DEFAULT_LEVELS

DEVICES = [None, "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)  # numpy, and the torch path (CPU; CUDA if here)
@pytest.mark.parametrize("budget", [1 << 30, 4000])  # one block, and 3-column blocks
def test_statistics_equal_numpy(budget, device):
    rng = np.random.default_rng(0)
    alpha = rng.gamma(2.0, 1.0, size=(57, 10)).astype(np.float32) - 1.0
    alpha[:, 3] = 0.0  # a dead filter: all ties
    alpha[5, 4] = alpha[9, 4] = alpha[:, 4].max() + 1  # tied maximum: smaller index first
    indices = np.arange(1000, 1057)
    levels = np.asarray(DEFAULT_LEVELS)
    beta_levels = np.asarray(DEFAULT_BETA_LEVELS)
    s = class_statistics(
        alpha, indices, levels, beta_levels, top_k=6, memory_budget_bytes=budget, device=device
    )

    np.testing.assert_array_equal(
        s.quantiles, np.percentile(alpha, levels, axis=0, method="linear").T.astype(np.float32)
    )
    np.testing.assert_allclose(s.mean, alpha.astype(np.float64).mean(0), rtol=1e-6)
    betas = (alpha.astype(np.float64) - alpha.astype(np.float64).mean(0)).mean(1)
    np.testing.assert_allclose(s.beta_quantiles, np.percentile(betas, beta_levels), atol=1e-6)
    for n in range(10):
        order = sorted(range(57), key=lambda i: (-alpha[i, n], i))[:6]
        np.testing.assert_array_equal(s.top_indices[n], indices[order])
        np.testing.assert_array_equal(s.top_alpha[n], alpha[order, n])
    assert list(s.top_indices[4][:2]) == [1005, 1009]
    assert s.count == 57


def test_fewer_images_than_top_k_and_empty_class():
    levels, beta_levels = np.asarray(DEFAULT_LEVELS), np.asarray(DEFAULT_BETA_LEVELS)
    budget = RunOptions().memory_budget_bytes
    s = class_statistics(np.ones((2, 3), np.float32), np.array([7, 8]), levels, beta_levels, 4,
                         budget)  # fmt: skip
    assert s.top_indices.tolist() == [[7, 8, -1, -1]] * 3
    assert np.isnan(s.top_alpha[:, 2:]).all()
    empty = class_statistics(np.zeros((0, 3), np.float32), np.zeros(0), levels, beta_levels, 4,
                             budget)  # fmt: skip
    assert empty.count == 0 and (empty.top_indices == -1).all()


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("n", [*range(1, 65), 30, 57, 999, 1000, 1001, 1300, 2500])
def test_torch_percentiles_are_numpys_exactly(n, device):
    """The torch path's percentiles equal numpy.percentile(method="linear") bit for bit (as
    float32; zeros compared by value), on ReLU-like columns full of ties, tiny classes and the
    sizes around 1000 where P99.9 changes form; its exemplars are numpy's stable order."""
    rng = np.random.default_rng(n)
    block = rng.normal(size=(n, 6)).astype(np.float32)
    block[:, 1] = np.maximum(block[:, 1], 0)  # about half zeros
    block[: n // 2, 2] = -0.0  # negative zeros tie with zeros
    block[:, 3] = 1.5  # one value
    block[:, 4] = np.round(block[:, 4] * 2) / 2  # few distinct values
    block[:, 5] *= 1e30  # large magnitudes
    levels = np.asarray(DEFAULT_LEVELS)
    quantiles, rows, values = sorted_block_statistics(block, levels, 6, torch.device(device))
    expect = np.percentile(block, levels, axis=0, method="linear").astype(np.float32)
    np.testing.assert_array_equal(quantiles, expect)
    assert quantiles.dtype == np.float32 and quantiles.shape == (len(levels), 6)
    order = np.argsort(-block, axis=0, kind="stable")[: min(6, n)]
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_array_equal(
        values.view(np.uint32), np.take_along_axis(block, order, 0).view(np.uint32)
    )
