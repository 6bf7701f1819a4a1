"""percentile_lookup: Triton kernel (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surprise_monitor import kernels
from surprise_monitor.kernels import percentile_lookup, prepare_lookup_table
from surprise_monitor.kernels.lookup_torch import percentile_lookup_torch


def _classes(b: int, k: int, device, seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (b,), generator=gen).to(device=device, dtype=dtype)


def _assert_same(res: kernels.LookupResult, ref: kernels.LookupResult) -> None:
    torch.testing.assert_close(res.percentile, ref.percentile, rtol=0, atol=1e-4)
    assert res.percentile.dtype == torch.float32
    assert res.surprise.dtype == torch.bool and res.expectation.dtype == torch.bool
    assert torch.equal(res.surprise, ref.surprise)
    assert torch.equal(res.expectation, ref.expectation)
    torch.testing.assert_close(res.beta, ref.beta, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.calibrated, ref.calibrated)
    assert (res.beta_percentile is None) == (ref.beta_percentile is None)
    if ref.beta_percentile is not None:
        torch.testing.assert_close(res.beta_percentile, ref.beta_percentile, rtol=0, atol=1e-4)
        assert torch.equal(res.low_beta, ref.low_beta)


@pytest.mark.parametrize("q", [2, 5, 25, 40])
@pytest.mark.parametrize("n", [1, 3, 512, 2048])
@pytest.mark.parametrize("b", [1, 3, 5])
def test_triton_matches_reference(b, n, q, device, need_triton, make_table, make_alpha):
    k = 6
    table = prepare_lookup_table(make_table(k, n, q, seed=n + q), device=device)
    classes = _classes(b, k, device, seed=b)
    alpha = make_alpha(table, classes, seed=q)
    ref = percentile_lookup_torch(alpha, classes, table)
    res = percentile_lookup(alpha, classes, table, backend="triton")
    _assert_same(res, ref)
    if b * n >= 512:  # the generated alphas do hit the interesting cases
        assert ref.percentile.min() == 0.0 and ref.percentile.max() == 100.0
        assert ref.surprise.any() and ref.expectation.any() and not ref.surprise.all()


@pytest.mark.parametrize(
    "blocks",
    [(16, 8, 1), (64, 4, 2), (32, 32, 4), (128, 16, 8)],
)
def test_triton_small_tiles_loop_over_chunks(blocks, device, need_triton, make_table, make_alpha):
    from surprise_monitor.kernels.lookup_triton import Tiles, percentile_lookup_triton

    table = prepare_lookup_table(make_table(5, 300, 25, seed=4), device=device)
    classes = _classes(7, 5, device, seed=3)
    alpha = make_alpha(table, classes, seed=8)
    res = percentile_lookup_triton(alpha, classes, table, Tiles(*blocks))
    _assert_same(res, percentile_lookup_torch(alpha, classes, table))


@pytest.mark.parametrize("b,n,q", [(3, 512, 25), (1, 3, 40), (5, 2048, 5), (40, 64, 29)])
def test_triton_with_cuda_tile_config(b, n, q, device, need_triton, make_table, make_alpha):
    from surprise_monitor.kernels.lookup_triton import (
        Tiles,
        _beta_blocks,
        _pick_blocks,
        percentile_lookup_triton,
    )

    table = prepare_lookup_table(make_table(4, n, q, seed=1), device=device)
    classes = _classes(b, 4, device, seed=2)
    alpha = make_alpha(table, classes, seed=3)
    bn, bq = _pick_blocks(b, n, q, cuda=True)
    br = _beta_blocks(b, -(-n // bn), 1, cuda=True)[0]
    res = percentile_lookup_triton(alpha, classes, table, Tiles(bn, bq, br))
    _assert_same(res, percentile_lookup_torch(alpha, classes, table))


def test_triton_strided_alpha_int32_classes_half_alpha(device, need_triton, make_table, make_alpha):
    table = prepare_lookup_table(make_table(3, 40, 25, seed=6), device=device)
    classes = _classes(5, 3, device, seed=1, dtype=torch.int32)
    alpha = make_alpha(table, classes, seed=2)
    strided = alpha.t().contiguous().t()  # same values, stride (1, B)
    assert not strided.is_contiguous()
    ref = percentile_lookup_torch(alpha, classes, table)
    _assert_same(percentile_lookup(strided, classes, table, backend="triton"), ref)
    half = alpha.to(torch.float16)
    _assert_same(
        percentile_lookup(half, classes, table, backend="triton"),
        percentile_lookup_torch(half, classes, table),
    )


def test_triton_empty_batch(device, need_triton, make_table):
    table = prepare_lookup_table(make_table(2, 8, 5), device=device)
    res = percentile_lookup(
        torch.zeros(0, 8, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        table,
        backend="triton",
    )
    assert res.percentile.shape == (0, 8) and res.beta.shape == (0,)


def test_auto_on_cpu_is_the_reference_and_raw_table_equals_prepared(make_table, make_alpha):
    raw = make_table(4, 64, 25, seed=2)
    table = prepare_lookup_table(raw)
    classes = _classes(6, 4, "cpu")
    alpha = make_alpha(table, classes)
    ref = percentile_lookup_torch(alpha, classes, table)
    for res in (
        percentile_lookup(alpha, classes, table),
        percentile_lookup(alpha, classes, raw, backend="torch"),
        percentile_lookup(alpha, classes, table, surprise_pct=99.9, expectation_pct=0.1),
    ):
        assert torch.equal(res.percentile, ref.percentile)
        assert torch.equal(res.surprise, ref.surprise)
        assert torch.equal(res.expectation, ref.expectation)
        assert torch.equal(res.beta, ref.beta)


def _with_beta(raw: SimpleNamespace, k: int, seed: int, qb: int = 101) -> SimpleNamespace:
    """``raw`` with counts (class 1 uncalibrated) and a beta grid with a flat run."""
    gen = torch.Generator().manual_seed(seed)
    raw.counts = torch.tensor([3] + [0] + [7] * (k - 2))
    raw.beta_levels = torch.linspace(0, 100, qb, dtype=torch.float64)
    grid = (torch.randn(k, qb, generator=gen) * 0.2).sort(-1).values
    grid[:, : qb // 3] = grid[:, qb // 3 : qb // 3 + 1]  # a flat run over the lowest third
    raw.beta_quantiles = grid
    return raw


@pytest.mark.parametrize("b,n", [(1, 7), (9, 300), (33, 64)])
def test_triton_with_counts_and_beta_grid(b, n, device, need_triton, make_table, make_alpha):
    k = 5
    table = prepare_lookup_table(_with_beta(make_table(k, n, 25, seed=b), k, b), device=device)
    classes = _classes(b, k, device, seed=b + 1)
    classes[0] = 1  # an uncalibrated class: nothing flagged
    alpha = make_alpha(table, classes, seed=5)
    ref = percentile_lookup_torch(alpha, classes, table)
    _assert_same(percentile_lookup(alpha, classes, table, backend="triton"), ref)
    assert not ref.surprise[0].any() and not ref.expectation[0].any() and not ref.low_beta[0]
    assert not ref.calibrated[0] and ref.calibrated[classes != 1].all()


def mid_rank(v: np.ndarray, grid: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The percentile rank by definition (numpy float64): mean of the left- and
    right-continuous ranks on ties, linear between distinct neighbours."""
    out = np.empty(v.shape)
    for i in np.ndindex(v.shape):
        g = grid[i]
        lo, hi = np.searchsorted(g, v[i], "left"), np.searchsorted(g, v[i], "right") - 1
        if lo <= hi:
            out[i] = (levels[lo] + levels[hi]) / 2
        else:
            out[i] = 0.0 if lo == 0 else 100.0 if lo == len(g) else np.interp(v[i], g, levels)
    return out


def test_flat_runs_get_the_mid_rank_in_both_paths(backend, device):
    """A ReLU'd filter that is 0 for 60% of a class: its grid is 0 up to the 60th percentile,
    and alpha = 0 ranks at the middle of that run (30 here), not at its top (60). Both paths
    agree with the definition, for alpha and for beta."""
    levels = np.array([0, 0.1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99.9, 100], np.float32)
    q = len(levels)
    relu = np.concatenate([np.zeros(8), np.linspace(0.1, 2.0, q - 8)]).astype(np.float32)
    smooth = np.linspace(-1.0, 1.0, q).astype(np.float32)
    grid = np.stack([np.stack([relu, smooth, relu * 2]) for _ in range(2)])  # [K=2, N=3, Q]
    raw = SimpleNamespace(
        levels=levels, quantiles=grid, mean=np.ones((2, 3), np.float32),
        counts=np.array([5, 5]), beta_levels=levels.astype(np.float64),
        beta_quantiles=np.stack([relu - 1.0, relu - 1.0]),
    )  # fmt: skip
    table = prepare_lookup_table(raw, device=device)
    alpha = np.array(
        [[0.0, 0.0, 0.0], [relu[9], smooth[4], 0.05], [-0.1, 1.5, 9.0], [1.0, 1.0, 1.0]],
        np.float32,
    )
    classes = torch.tensor([0, 1, 0, 1], device=device)
    res = percentile_lookup(torch.from_numpy(alpha).to(device), classes, table, backend=backend)
    got = res.percentile.cpu().numpy()
    expect = mid_rank(alpha, grid[classes.cpu().numpy()], levels.astype(np.float64))
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)
    assert got[0, 0] == pytest.approx(30.0) and got[0, 2] == pytest.approx(30.0)
    beta = res.beta.cpu().numpy()
    np.testing.assert_allclose(beta, (alpha - 1.0).mean(axis=1), rtol=1e-6, atol=1e-6)
    beta_grid = raw.beta_quantiles[classes.cpu().numpy()]
    bexpect = mid_rank(beta, beta_grid, levels.astype(np.float64))
    np.testing.assert_allclose(res.beta_percentile.cpu().numpy(), bexpect, rtol=0, atol=1e-4)
    assert res.beta_percentile[0] == pytest.approx(30.0)  # beta = 0 - 1 = G[0..7]: mid-rank


@pytest.mark.parametrize("surprise_pct", [99.9, 97.0])
def test_triton_on_a_level_major_grid(surprise_pct, device, need_triton, make_table, make_alpha):
    """The layout prepared for CUDA (a level-major view) and thresholds read from the grid or
    precomputed between levels give the reference's results."""
    raw = make_table(5, 300, 29, seed=9)
    raw.quantiles = raw.quantiles.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    table = prepare_lookup_table(raw, surprise_pct=surprise_pct, device=device)
    assert table.quantiles.permute(2, 0, 1).is_contiguous()
    assert (table.surprise.column is None) == (surprise_pct == 97.0)
    classes = _classes(6, 5, device, seed=4)
    alpha = make_alpha(table, classes, seed=2)
    ref = percentile_lookup_torch(alpha, classes, table)
    _assert_same(percentile_lookup(alpha, classes, table, backend="triton"), ref)
