"""Public ``grad_amap``: validation + backend dispatch."""

from __future__ import annotations

import torch

from surprise_monitor.kernels._backend import DEFAULT_BACKEND, Backend, fmt_shape, resolve_backend
from surprise_monitor.kernels.amap_torch import grad_amap_torch

__all__ = ["grad_amap"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate(activation: torch.Tensor, gradient: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both inputs are float ``[B, N, H, W]`` tensors of one shape
    and device with ``H * W > 0`` (shape checks only: no host sync)."""
    p = "grad_amap"
    for name, t in (("activation", activation), ("gradient", gradient)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{p}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{p}: {name} must be 4-D [B, N, H, W], got {fmt_shape(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{p}: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if activation.shape != gradient.shape:
        raise ValueError(
            f"{p}: activation and gradient shapes differ: "
            f"{fmt_shape(activation.shape)} vs {fmt_shape(gradient.shape)}"
        )
    if activation.device != gradient.device:
        raise ValueError(
            f"{p}: activation and gradient are on different devices: "
            f"{activation.device} vs {gradient.device}"
        )
    if activation.shape[2] * activation.shape[3] == 0:
        raise ValueError(f"{p}: spatial size H*W is zero: {fmt_shape(activation.shape)}")


@torch.no_grad()
def grad_amap(
    activation: torch.Tensor, gradient: torch.Tensor, *, backend: Backend = DEFAULT_BACKEND
) -> torch.Tensor:
    """Grad-AMap filter scores ``alpha[b, n] = mean_{h,w}(activation * gradient)``.

    Args:
        activation: ``[B, N, H, W]`` float32/float16/bfloat16 (float64 accepted), any
            strides (NCHW, channels-last, ...).
        gradient: same shape and device as ``activation``; its layout and float dtype may
            differ.
        backend: ``"auto"`` (Triton for CUDA tensors when available, else PyTorch),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"``.

    Returns:
        ``[B, N]`` float32, accumulated in float32 whatever the input dtype. Not
        differentiable (runs under ``torch.no_grad``).

    Raises:
        ValueError: non-4-D inputs, shape/device mismatch, non-float dtype, H*W == 0, or a
            backend that cannot run here.
    """
    _validate(activation, gradient)
    if resolve_backend("grad_amap", backend, activation.device) == "torch":
        return grad_amap_torch(activation, gradient)
    from surprise_monitor.kernels.amap_triton import grad_amap_triton

    return grad_amap_triton(activation, gradient)
