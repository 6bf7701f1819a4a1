"""The plain-PyTorch paths (the references of the Triton kernels) against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surprise_monitor.kernels import amap_torch, prepare_lookup_table
from surprise_monitor.kernels.amap_torch import grad_amap_torch
from surprise_monitor.kernels.lookup_torch import percentile_lookup_torch

CL = torch.channels_last


@pytest.mark.parametrize("layout", ["nchw", "cl", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 7), (11, 512, 14, 14), (2, 3, 4, 6)])
def test_grad_amap_torch_vs_numpy_float64(shape, dtype, layout):
    # (11, 512, 14, 14) is larger than one CPU chunk: exercises the chunked loop
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if layout in ("cl", "mixed"):
        a = a.contiguous(memory_format=CL)
    if layout == "cl":
        g = g.contiguous(memory_format=CL)
    out = grad_amap_torch(a, g)
    expect = (a.double().numpy() * g.double().numpy()).mean((2, 3))
    assert out.dtype == torch.float32 and out.shape == shape[:2]
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 48, 100])
@pytest.mark.parametrize("layout", ["nchw", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_amap_torch_chunked_loop(chunk, layout, dtype, monkeypatch):
    monkeypatch.setattr(amap_torch, "_CHUNK_ELEMS", chunk)  # 1 sample = 48 elements
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, 4, 4, generator=gen).to(dtype)
    g = torch.randn(5, 3, 4, 4, generator=gen).to(dtype)
    if layout == "mixed":
        g = g.contiguous(memory_format=CL)
    expect = (a.double().numpy() * g.double().numpy()).mean((2, 3))
    np.testing.assert_allclose(grad_amap_torch(a, g).numpy(), expect, rtol=1e-5, atol=1e-6)


def test_grad_amap_torch_known_values():
    a = torch.arange(8.0).reshape(1, 2, 2, 2)
    g = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    # filter 0: mean(0,1,2,3) = 1.5; filter 1: -mean(4,5,6,7) = -5.5
    assert grad_amap_torch(a, g).tolist() == [[1.5, -5.5]]


def test_percentile_lookup_torch_vs_numpy(strict_grid):
    rng = np.random.default_rng(2)
    k, n, q, b = 5, 17, 9, 11
    levels = np.array([0, 0.1, 10, 30, 50, 70, 90, 99.9, 100], dtype=np.float32)
    grid = strict_grid(rng, (k, n), q)
    mean = rng.normal(size=(k, n)).astype(np.float32)
    table = prepare_lookup_table(
        type("T", (), {"levels": levels, "quantiles": grid, "mean": mean})()
    )
    classes = rng.integers(0, k, size=b)
    alpha = rng.normal(scale=1.5, size=(b, n)).astype(np.float32)
    res = percentile_lookup_torch(torch.from_numpy(alpha), torch.from_numpy(classes), table)
    g = grid[classes]
    pct = np.array([[np.interp(alpha[i, j], g[i, j], levels) for j in range(n)] for i in range(b)])
    np.testing.assert_allclose(res.percentile.numpy(), pct, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(res.surprise.numpy(), alpha > g[..., 7])  # level 99.9
    guard = mean > mean.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(res.expectation.numpy(), (alpha < g[..., 1]) & guard[classes])
    beta = (alpha.astype(np.float64) - mean[classes]).mean(axis=1)
    np.testing.assert_allclose(res.beta.numpy(), beta, rtol=1e-5, atol=1e-6)
    assert res.surprise.any() and res.expectation.any()
