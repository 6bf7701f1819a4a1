"""grad_amap: Triton kernel (interpreter on CPU) vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from surprise_monitor.kernels import grad_amap
from surprise_monitor.kernels.amap_torch import grad_amap_torch

CL = torch.channels_last
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _pair(b, n, h, w, dtype, layout, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, h, w, generator=gen).to(dtype)
    g = torch.randn(b, n, h, w, generator=gen).to(dtype)
    a_cl, g_cl = {"nchw": (0, 0), "cl": (1, 1), "nchw+cl": (0, 1), "cl+nchw": (1, 0)}[layout]
    a = a.contiguous(memory_format=CL) if a_cl else a
    g = g.contiguous(memory_format=CL) if g_cl else g
    return a.to(device), g.to(device)


@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (14, 14)])
@pytest.mark.parametrize("n", [1, 3, 512, 2048])
@pytest.mark.parametrize("b", [1, 3, 5])
def test_triton_matches_reference_shapes(b, n, hw, device, need_triton):
    a, g = _pair(b, n, *hw, torch.float32, "nchw", device, seed=b * 7 + n)
    out = grad_amap(a, g, backend="triton")
    assert out.shape == (b, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, grad_amap_torch(a, g), **TOL)


@pytest.mark.parametrize("layout", ["nchw", "cl", "nchw+cl", "cl+nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 512, 7, 7), (5, 3, 14, 14), (1, 2048, 1, 1)])
def test_triton_dtypes_and_layouts(shape, dtype, layout, device, need_triton):
    a, g = _pair(*shape, dtype, layout, device, seed=3)
    out = grad_amap(a, g, backend="triton")
    assert out.dtype == torch.float32
    # both paths upcast before multiplying, so half inputs agree to fp32 rounding
    torch.testing.assert_close(out, grad_amap_torch(a, g), **TOL)


@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((3, 5, 3, 5), (2, 4)),  # odd HW=15 over 4 chunks, ragged last row block
        ((5, 3, 14, 14), (4, 64)),  # HW=196 over 4 chunks
        ((3, 7, 2, 9), (8, 2)),  # non-square, tiny HW chunks
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "cl", "cl+nchw"])
def test_triton_small_tiles_loop_over_chunks(shape, blocks, layout, device, need_triton):
    from surprise_monitor.kernels.amap_triton import grad_amap_triton

    a, g = _pair(*shape, torch.float32, layout, device, seed=11)
    out = grad_amap_triton(a, g, block_r=blocks[0], block_hw=blocks[1])
    torch.testing.assert_close(out, grad_amap_torch(a, g), **TOL)


@pytest.mark.parametrize("layout", ["nchw", "cl", "nchw+cl"])
@pytest.mark.parametrize("shape", [(3, 512, 7, 7), (1, 3, 14, 14), (5, 64, 1, 1), (2, 48, 14, 14)])
def test_triton_every_cuda_tile_config(shape, layout, device, need_triton):
    """Every tile the CUDA autotuner may pick for the shape gives the right answer (run here
    in the interpreter when there is no GPU)."""
    from surprise_monitor.kernels.amap_triton import _configs, _prune, grad_amap_triton

    a, g = _pair(*shape, torch.float32, layout, device, seed=5)
    b, n, h, w = shape
    ref = grad_amap_torch(a, g)
    cl = a.stride(1) == 1 and h * w > 1 and n > 1
    kept = _prune(_configs(), {"HW": h * w}, CHANNELS_LAST=cl)
    assert 1 <= len(kept) <= 6  # tuning stays short
    for config in kept:
        br, bhw = config.kwargs["BLOCK_R"], config.kwargs["BLOCK_HW"]
        out = grad_amap_triton(a, g, block_r=br, block_hw=bhw)
        torch.testing.assert_close(out, ref, **TOL, msg=f"{config}")


@pytest.mark.parametrize("layout", ["nchw", "cl+nchw"])
def test_triton_64_bit_offsets_and_alignment_hints(layout, device, need_triton):
    """The 64-bit offset path (inputs of 2**31 elements and more) and the unaligned views
    (no vectorisation hint) compute the same values."""
    from surprise_monitor.kernels.amap_triton import _layout, grad_amap_triton

    a, g = _pair(3, 32, 4, 4, torch.float32, layout, device, seed=6)
    ref = grad_amap_torch(a, g)
    assert _layout(a)[2] == 16 if layout == "nchw" else _layout(a)[2] == 1
    torch.testing.assert_close(grad_amap_triton(a, g, int64=True), ref, **TOL)
    buf = torch.empty(a.numel() + 1, device=device)
    a1 = buf[1:].view(a.shape).copy_(a)  # base address 4 bytes past an aligned one
    assert _layout(a1)[2] == 1
    torch.testing.assert_close(grad_amap_triton(a1, g), ref, **TOL)


def test_triton_general_strides(device, need_triton):
    """Non-collapsible (h, w) strides, a storage offset and a stride-0 (expanded) input."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 6, 9, 10, generator=gen).to(device)
    a = base[1:, 1:5, ::2, 1:8]  # [2, 4, 5, 7], sH != W * sW
    g = torch.randn(2, 4, 7, 5, generator=gen).to(device).transpose(2, 3)  # [2, 4, 5, 7]
    e = torch.randn(1, 4, 1, 1, generator=gen).to(device).expand(2, 4, 5, 7)
    for x, y in ((a, g), (g, a), (a, e), (e, g)):
        out = grad_amap(x, y, backend="triton")
        torch.testing.assert_close(out, (x * y).mean((2, 3)), **TOL)


def test_triton_empty_batch(device, need_triton):
    a = torch.randn(0, 5, 3, 3, device=device)
    out = grad_amap(a, a, backend="triton")
    assert out.shape == (0, 5) and out.dtype == torch.float32


def test_torch_backend_and_auto_on_cpu_agree_exactly():
    a, g = _pair(4, 33, 7, 7, torch.float32, "nchw+cl", "cpu", seed=9)
    ref = grad_amap_torch(a, g)
    assert torch.equal(grad_amap(a, g, backend="torch"), ref)
    assert torch.equal(grad_amap(a, g), ref)
    assert grad_amap(a[:0], g[:0]).shape == (0, 33)


def test_inputs_requiring_grad_give_detached_output():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    out = grad_amap(a, g, backend="torch")
    assert not out.requires_grad
    torch.testing.assert_close(out, (a.detach() * g).mean((2, 3)), **TOL)
