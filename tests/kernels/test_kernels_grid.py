"""Percentile grids: ranks on a grid and values read off it, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.kernels import percentile_rank, quantile_at


def test_percentile_rank_matches_numpy_interp_on_strict_grids(strict_grid):
    rng = np.random.default_rng(0)
    levels = np.concatenate([[0.0], np.sort(rng.uniform(0, 100, 23)), [100.0]]).astype(np.float32)
    grid = strict_grid(rng, (40,), 25)
    values = rng.normal(scale=1.5, size=(40, 30)).astype(np.float32)
    values[:, :25] = grid  # exactly on every grid point
    out = percentile_rank(
        torch.from_numpy(values), torch.from_numpy(grid)[:, None, :], torch.from_numpy(levels)
    )
    expect = np.stack([[np.interp(v, grid[i], levels) for v in values[i]] for i in range(40)])
    assert out.shape == (40, 30) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-4)
    assert (out[:, :25].numpy() == levels).all()  # on a grid point: exactly its level


def test_percentile_rank_ties_and_flat_runs_by_hand():
    """A value on a flat run (or a single grid point) gets the mid-rank of the run."""
    levels = torch.tensor([0.0, 25.0, 50.0, 75.0, 100.0])
    cases = {
        (0.0, 1.0, 1.0, 1.0, 2.0): {
            -0.1: 0.0,
            0.0: 0.0,
            0.5: 12.5,
            1.0: 50.0,  # G[1..3] = 1: (25 + 75) / 2, not the top of the run (75)
            1.5: 87.5,
            2.0: 100.0,
            3.0: 100.0,
        },
        (1.0, 1.0, 1.0, 2.0, 3.0): {0.999: 0.0, 1.0: 25.0, 1.5: 62.5, 2.5: 87.5},
        (0.0, 1.0, 2.0, 2.0, 2.0): {1.5: 37.5, 2.0: 75.0},
        (5.0, 5.0, 5.0, 5.0, 5.0): {4.0: 0.0, 5.0: 50.0, 6.0: 100.0},
    }
    for grid, expect in cases.items():
        g = torch.tensor(grid)
        v = torch.tensor(list(expect))
        got = percentile_rank(v, g, levels)  # grid broadcasts over values
        assert got.tolist() == pytest.approx(list(expect.values()), abs=1e-5), grid


def mid_rank_oracle(v: float, grid: np.ndarray, levels: np.ndarray) -> float:
    """The rank by the definition, in numpy float64: the mean of the left- and
    right-continuous ranks on a tie, numpy.interp between distinct neighbours."""
    lo = int(np.searchsorted(grid, v, side="left"))
    hi = int(np.searchsorted(grid, v, side="right")) - 1
    if lo <= hi:
        return (float(levels[lo]) + float(levels[hi])) / 2
    if lo == 0:
        return 0.0
    if lo == len(grid):
        return 100.0
    return float(np.interp(v, grid[lo - 1 : lo + 1], levels[lo - 1 : lo + 1]))


def test_percentile_rank_mid_rank_on_a_relu_filters_grid():
    """A ReLU'd filter that is 0 for 60% of a class: alpha = 0 ranks at the middle of the
    run of zeros, and the grid of 1001 exact sample percentiles agrees with
    scipy.stats.percentileofscore(kind="mean") on the samples themselves."""
    rng = np.random.default_rng(3)
    samples = np.concatenate([np.zeros(600), rng.gamma(2.0, size=401)]).astype(np.float32)
    levels = np.round(np.arange(1001) * 0.1, 1)
    grid = np.percentile(samples, levels, method="linear").astype(np.float32)
    assert (grid[:600] == 0).all() and grid[600] > 0  # a flat run of 600 grid points
    probes = np.concatenate([[0.0, -1.0, 100.0], grid[595:610], rng.choice(samples, 40)])
    got = percentile_rank(
        torch.from_numpy(probes.astype(np.float32)),
        torch.from_numpy(grid),
        torch.from_numpy(levels.astype(np.float32)),
    ).numpy()
    expect = [mid_rank_oracle(v, grid.astype(np.float64), levels) for v in probes]
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)
    assert got[0] == pytest.approx(29.95, abs=1e-4)  # (0 + 59.9) / 2, not 59.9
    scipy_stats = pytest.importorskip("scipy.stats")
    on_samples = [scipy_stats.percentileofscore(samples, v, kind="mean") for v in probes]
    np.testing.assert_allclose(got, on_samples, rtol=0, atol=0.1)  # n vs n - 1 conventions


def test_percentile_rank_broadcasts():
    levels = torch.tensor([0.0, 50.0, 100.0])
    grid = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]])  # [2, Q]
    v = torch.tensor([[1.0], [3.0], [0.5]])  # [3, 1] -> [3, 2]
    got = percentile_rank(v, grid, levels)
    assert got.tolist() == [[50.0, 25.0], [100.0, 75.0], [25.0, 12.5]]


def test_quantile_at_on_a_numpy_percentile_grid():
    rng = np.random.default_rng(1)
    samples = rng.gamma(2.0, size=(3, 4, 500))
    levels = np.array([0, 0.1, 1, 5, 25, 50, 75, 95, 99, 99.9, 100])
    grid64 = np.moveaxis(np.percentile(samples, levels, axis=-1, method="linear"), 0, -1)
    grid = torch.from_numpy(grid64.astype(np.float32))
    lv = torch.from_numpy(levels.astype(np.float32))
    for j, pct in enumerate(levels):
        got = quantile_at(grid, lv, float(pct))
        assert torch.equal(got, grid[..., j])  # grid level -> exactly the column
        expect = np.percentile(samples, pct, axis=-1, method="linear").astype(np.float32)
        np.testing.assert_array_equal(got.numpy(), expect)
    for pct in (0.05, 3.0, 60.0, 99.95):  # between levels: linear in level
        got = quantile_at(grid, lv, pct).numpy()
        expect = np.apply_along_axis(lambda g, p=pct: np.interp(p, levels, g), -1, grid64)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
        # rank of the interpolated value is the pct again (strictly increasing grid)
        back = percentile_rank(torch.from_numpy(got), grid, lv)
        np.testing.assert_allclose(back.numpy(), pct, atol=1e-3)
    with pytest.raises(ValueError, match="outside the grid"):
        quantile_at(grid, lv, 100.5)


def test_the_grid_check_reads_in_chunks_and_names_the_global_index():
    from surprise_monitor.kernels import check_percentile_grid

    levels = torch.tensor([0.0, 50.0, 100.0])
    grid = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(5, 4, 3)
    grid[3, 2, 2] = -1.0  # class 3, filter 2: decreases into level index 2
    grid[4, 0, 1] = -9.0
    calls = []
    with pytest.raises(
        ValueError, match=r"2 steps decrease, first at class 3, filter 2, level index 1"
    ):
        check_percentile_grid(levels, grid, chunk=2, after_chunk=lambda: calls.append(1))
    assert len(calls) == 3  # classes 0-1, 2-3, 4
    grid[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"quantiles have 1 non-finite values"):
        check_percentile_grid(levels, grid, chunk=1)
    check_percentile_grid(levels, grid, values=False)  # shapes and levels only
