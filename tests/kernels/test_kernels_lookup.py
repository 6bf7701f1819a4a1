"""percentile_lookup: Triton kernel (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import percentile_lookup, prepare_lookup_table
from kernels.lookup_torch import percentile_lookup_torch


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
    [(1, 16, 8), (2, 64, 4), (4, 32, 32), (8, 128, 16)],
)
def test_triton_small_tiles_loop_over_chunks(blocks, device, need_triton, make_table, make_alpha):
    from kernels.lookup_triton import percentile_lookup_triton

    table = prepare_lookup_table(make_table(5, 300, 25, seed=4), device=device)
    classes = _classes(7, 5, device, seed=3)
    alpha = make_alpha(table, classes, seed=8)
    res = percentile_lookup_triton(
        alpha, classes, table, block_b=blocks[0], block_n=blocks[1], block_q=blocks[2]
    )
    _assert_same(res, percentile_lookup_torch(alpha, classes, table))


@pytest.mark.parametrize("b,n,q", [(3, 512, 25), (1, 3, 40), (5, 2048, 5)])
def test_triton_with_cuda_tile_config(b, n, q, device, need_triton, make_table, make_alpha):
    from kernels.lookup_triton import _pick_blocks, percentile_lookup_triton

    table = prepare_lookup_table(make_table(4, n, q, seed=1), device=device)
    classes = _classes(b, 4, device, seed=2)
    alpha = make_alpha(table, classes, seed=3)
    bb, bn, bq = _pick_blocks(b, n, q, cuda=True)
    res = percentile_lookup_triton(alpha, classes, table, block_b=bb, block_n=bn, block_q=bq)
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
