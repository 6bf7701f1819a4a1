"""Benchmarks for kernels.grad_amap and kernels.percentile_lookup.

Run: ``pytest bench/test_kernels.py --benchmark-only`` (well under a few minutes on CPU).
Each ``benchmark.group`` holds the variants of one shape; the variant named ``plain*`` is
the group's baseline (naive PyTorch), so ratios can be read off the table.
The CUDA section (Triton vs eager vs torch.compile, with effective GB/s in ``extra_info``)
is skipped without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surprise_monitor.kernels import grad_amap, percentile_lookup, prepare_lookup_table
from surprise_monitor.kernels.lookup_torch import percentile_lookup_torch

AMAP_SHAPES = [(b, n, hw) for b in (8, 32) for n in (512, 2048) for hw in (49, 196)]
LOOKUP_SHAPES = [(b, n) for b in (8, 32) for n in (512, 2048)]
K, Q = 1000, 25
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="CUDA unavailable: Triton / torch.compile GPU benchmarks need a GPU"
)


def _amap_inputs(b, n, hw, device="cpu", dtype=torch.float32):
    side = int(round(hw**0.5))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(b, n, side, side, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(b, n, side, side, generator=gen).to(device=device, dtype=dtype)
    return a, g


def _naive(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (a.float() * g.float()).mean((2, 3))


_TABLES: dict[tuple[int, str], object] = {}


def _table(n: int, device: str = "cpu"):
    """Prepared K=1000, Q=25 table (cached: the N=2048 one is 200 MB)."""
    if (n, device) not in _TABLES:
        gen = torch.Generator().manual_seed(0)
        steps = torch.rand(K, n, Q, generator=gen)
        quantiles = steps.cumsum_(-1).sub_(Q / 2)
        levels = torch.tensor(
            [0.0, 0.1, 1.0, *torch.linspace(5, 95, Q - 6).tolist(), 99.0, 99.9, 100.0]
        )
        raw = SimpleNamespace(levels=levels, quantiles=quantiles, mean=torch.randn(K, n))
        _TABLES[(n, device)] = prepare_lookup_table(raw, device=device)
    return _TABLES[(n, device)]


def _lookup_inputs(b, n, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    alpha = (torch.randn(b, n, generator=gen) * 4).to(device)
    classes = torch.randint(0, K, (b,), generator=gen).to(device)
    return alpha, classes


# ---- CPU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["kernels_torch", "kernels_torch_cl", "plain", "numpy_f64"])
@pytest.mark.parametrize("b,n,hw", AMAP_SHAPES)
def test_cpu_grad_amap(benchmark, b, n, hw, variant):
    benchmark.group = f"cpu grad_amap B={b} N={n} HW={hw}"
    a, g = _amap_inputs(b, n, hw)
    if variant == "kernels_torch":
        fn: Callable[[], object] = lambda: grad_amap(a, g, backend="torch")  # noqa: E731
    elif variant == "kernels_torch_cl":
        a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
        fn = lambda: grad_amap(a, g, backend="torch")  # noqa: E731
    elif variant == "plain":  # the naive (a * g).mean((2, 3)) baseline
        fn = lambda: (a * g).mean((2, 3))  # noqa: E731
    else:
        a64, g64 = a.double().numpy(), g.double().numpy()
        fn = lambda: (a64 * g64).mean((2, 3))  # noqa: E731
    out = benchmark(fn)
    assert tuple(out.shape) == (b, n)


@pytest.mark.parametrize("variant", ["public", "plain_reference"])
@pytest.mark.parametrize("b,n", LOOKUP_SHAPES)
def test_cpu_percentile_lookup(benchmark, b, n, variant):
    """``public``: percentile_lookup(backend="torch") with a prepared table, including
    validation (NaN and class-range checks); ``plain_reference``: the bare torch computation."""
    benchmark.group = f"cpu percentile_lookup B={b} N={n} Q={Q} K={K}"
    table = _table(n)
    alpha, classes = _lookup_inputs(b, n)
    if variant == "public":
        res = benchmark(lambda: percentile_lookup(alpha, classes, table, backend="torch"))
    else:
        res = benchmark(lambda: percentile_lookup_torch(alpha, classes, table))
    assert res.percentile.shape == (b, n)


# ---- CUDA ----------------------------------------------------------------------------------


def _cuda_timed(benchmark, fn: Callable[[], object], nbytes: int) -> object:
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # warm-up: Triton JIT / torch.compile
        run()
    out = benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 1)
    return out


@needs_cuda
@pytest.mark.parametrize("variant", ["triton", "plain_eager", "torch_compile"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,hw", [(32, 2048, 196), (32, 512, 49), (8, 2048, 49)])
def test_cuda_grad_amap(benchmark, b, n, hw, dtype, layout, variant):
    benchmark.group = f"cuda grad_amap B={b} N={n} HW={hw} {str(dtype)[6:]} {layout}"
    a, g = _amap_inputs(b, n, hw, device="cuda", dtype=dtype)
    if layout == "channels_last":
        a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
    nbytes = 2 * a.numel() * a.element_size() + b * n * 4
    if variant == "triton":
        fn: Callable[[], object] = lambda: grad_amap(a, g, backend="triton")  # noqa: E731
    elif variant == "plain_eager":
        fn = lambda: _naive(a, g)  # noqa: E731
    else:
        torch.compiler.reset()  # fresh cache: 12 shape/dtype/layout combos exceed the limit
        compiled = torch.compile(_naive, dynamic=False)
        fn = lambda: compiled(a, g)  # noqa: E731
    out = _cuda_timed(benchmark, fn, nbytes)
    torch.testing.assert_close(out, _naive(a, g), rtol=1e-3, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("variant", ["triton", "plain_reference"])
@pytest.mark.parametrize("b,n", LOOKUP_SHAPES)
def test_cuda_percentile_lookup(benchmark, b, n, variant):
    benchmark.group = f"cuda percentile_lookup B={b} N={n} Q={Q} K={K}"
    table = _table(n, "cuda")
    alpha, classes = _lookup_inputs(b, n, "cuda")
    # bytes touched: alpha + gathered grid rows + 3 [B, N] side tables + outputs
    nbytes = b * n * (4 + Q * 4 + 3 * 4 + 1 + 4 + 2) + b * 4
    if variant == "triton":
        fn: Callable[[], object] = lambda: percentile_lookup(  # noqa: E731
            alpha, classes, table, backend="triton", check_values=False
        )
    else:
        fn = lambda: percentile_lookup_torch(alpha, classes, table)  # noqa: E731
    res = _cuda_timed(benchmark, fn, nbytes)
    ref = percentile_lookup_torch(alpha, classes, table)
    torch.testing.assert_close(res.percentile, ref.percentile, rtol=0, atol=1e-3)
    assert np.array_equal(res.surprise.cpu().numpy(), ref.surprise.cpu().numpy())
