"""``grad_amap`` in plain PyTorch: the reference the Triton kernel is tested against, and the
production path on CPU (and wherever Triton is not used)."""

from __future__ import annotations

import torch

__all__ = ["grad_amap_torch"]

# Elements per chunk of the CPU grad_amap loop (4 MB of float32): bigger inputs are processed
# in batch chunks reusing one cache-sized temporary instead of materialising the whole
# [B, N, H, W] product (several times faster once that product spills out of cache).
_CHUNK_ELEMS = 1 << 20


@torch.no_grad()
def grad_amap_torch(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``alpha[b, n] = mean_{h,w}(activation * gradient)`` as float32 ``[B, N]``.

    Inputs are ``[B, N, H, W]`` of any float dtype and layout; half-precision inputs are
    upcast to float32 before the product, so accumulation is float32. On CPU, inputs larger
    than ``_CHUNK_ELEMS`` are processed in batch chunks reusing one temporary buffer. No
    validation is done here (see :func:`surprise_monitor.kernels.grad_amap`).
    """
    b, n, h, w = activation.shape
    hw = h * w
    upcast = activation.dtype != torch.float32 or gradient.dtype != torch.float32
    per_sample = max(1, n * hw)
    if activation.device.type != "cpu" or b * per_sample <= _CHUNK_ELEMS:
        a, g = (activation.float(), gradient.float()) if upcast else (activation, gradient)
        return (a * g).mean(dim=(2, 3))
    out = torch.empty((b, n), dtype=torch.float32, device=activation.device)
    step = max(1, _CHUNK_ELEMS // per_sample)
    buf: torch.Tensor | None = None
    for start in range(0, b, step):
        a = activation[start : start + step]
        g = gradient[start : start + step]
        if upcast:
            a, g = a.float(), g.float()
        if buf is None:
            buf = torch.empty_like(a)
        prod = buf[: a.shape[0]]
        torch.mul(a, g, out=prod)
        torch.sum(prod, dim=(2, 3), out=out[start : start + step])
    return out.div_(hw)
