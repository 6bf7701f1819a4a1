"""The PyTorch references against independent numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import prepare_lookup_table, reference
from kernels.reference import (
    grad_amap_reference,
    percentile_lookup_reference,
    percentile_rank,
    quantile_at,
)

CL = torch.channels_last


@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 7), (11, 512, 14, 14), (2, 3, 4, 6)])
def test_grad_amap_reference_vs_numpy_float64(shape, dtype, layout):
    # (11, 512, 14, 14) is larger than one CPU chunk: exercises the chunked loop
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if layout in ("cl", "mixed"):
        a = a.contiguous(memory_format=CL)
    if layout == "cl":
        g = g.contiguous(memory_format=CL)
    out = grad_amap_reference(a, g)
    expect = (a.double().numpy() * g.double().numpy()).mean((2, 3))
    assert out.dtype == torch.float32 and out.shape == shape[:2]
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 48, 100])
@pytest.mark.parametrize("layout", ["nchw", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_amap_reference_chunked_loop(chunk, layout, dtype, monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", chunk)  # 1 sample = 48 elements
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, 4, 4, generator=gen).to(dtype)
    g = torch.randn(5, 3, 4, 4, generator=gen).to(dtype)
    if layout == "mixed":
        g = g.contiguous(memory_format=CL)
    expect = (a.double().numpy() * g.double().numpy()).mean((2, 3))
    np.testing.assert_allclose(grad_amap_reference(a, g).numpy(), expect, rtol=1e-5, atol=1e-6)


def test_grad_amap_reference_known_values():
    a = torch.arange(8.0).reshape(1, 2, 2, 2)
    g = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    # filter 0: mean(0,1,2,3) = 1.5; filter 1: -mean(4,5,6,7) = -5.5
    assert grad_amap_reference(a, g).tolist() == [[1.5, -5.5]]


def _strict_grid(rng, shape, q):
    x = np.sort(rng.normal(size=(*shape, q)), axis=-1)
    x += np.arange(q) * 1e-3  # strictly increasing
    return x.astype(np.float32)


def test_percentile_rank_matches_numpy_interp_on_strict_grids():
    rng = np.random.default_rng(0)
    levels = np.concatenate([[0.0], np.sort(rng.uniform(0, 100, 23)), [100.0]]).astype(np.float32)
    grid = _strict_grid(rng, (40,), 25)
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
    levels = torch.tensor([0.0, 25.0, 50.0, 75.0, 100.0])
    cases = {
        (0.0, 1.0, 1.0, 1.0, 2.0): {
            -0.1: 0.0,
            0.0: 0.0,
            0.5: 12.5,
            1.0: 75.0,
            1.5: 87.5,
            2.0: 100.0,
            3.0: 100.0,
        },
        (1.0, 1.0, 1.0, 2.0, 3.0): {0.999: 0.0, 1.0: 50.0, 1.5: 62.5, 2.5: 87.5},
        (0.0, 1.0, 2.0, 2.0, 2.0): {1.5: 37.5, 2.0: 100.0},
        (5.0, 5.0, 5.0, 5.0, 5.0): {4.0: 0.0, 5.0: 100.0, 6.0: 100.0},
    }
    for grid, expect in cases.items():
        g = torch.tensor(grid)
        v = torch.tensor(list(expect))
        got = percentile_rank(v, g, levels)  # grid broadcasts over values
        assert got.tolist() == pytest.approx(list(expect.values()), abs=1e-5), grid


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


def test_percentile_lookup_reference_vs_numpy():
    rng = np.random.default_rng(2)
    k, n, q, b = 5, 17, 9, 11
    levels = np.array([0, 0.1, 10, 30, 50, 70, 90, 99.9, 100], dtype=np.float32)
    grid = _strict_grid(rng, (k, n), q)
    mean = rng.normal(size=(k, n)).astype(np.float32)
    table = prepare_lookup_table(
        type("T", (), {"levels": levels, "quantiles": grid, "mean": mean})()
    )
    classes = rng.integers(0, k, size=b)
    alpha = rng.normal(scale=1.5, size=(b, n)).astype(np.float32)
    res = percentile_lookup_reference(torch.from_numpy(alpha), torch.from_numpy(classes), table)
    g = grid[classes]
    pct = np.array([[np.interp(alpha[i, j], g[i, j], levels) for j in range(n)] for i in range(b)])
    np.testing.assert_allclose(res.percentile.numpy(), pct, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(res.surprise.numpy(), alpha > g[..., 7])  # level 99.9
    guard = mean > mean.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(res.expectation.numpy(), (alpha < g[..., 1]) & guard[classes])
    beta = (alpha.astype(np.float64) - mean[classes]).mean(axis=1)
    np.testing.assert_allclose(res.beta.numpy(), beta, rtol=1e-5, atol=1e-6)
    assert res.surprise.any() and res.expectation.any()
