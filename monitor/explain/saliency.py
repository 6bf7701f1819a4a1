"""Vanilla input gradients, optionally restricted to the gradient through chosen filters.

``input_gradient(model, layer, x, classes, channels=n)`` is the gradient of the class score with
respect to the input pixels that flows *only through channel n* of ``layer``'s output: the
gradient reaching the layer's output, ``G = dO_c / dA``, has every other channel set to zero and
is carried back to the input, ``(dA / dx)^T (G * mask_n)``. Equivalently: the input gradient of a
network re-wired so that only channel n of ``A`` depends on the input and every other channel
(and any path that bypasses the layer, such as a residual shortcut around it) is a constant.
With ``channels=None`` it is the plain vanilla gradient ``dO_c / dx`` through every path.

Gradients are linear in ``G``, so for a plain chain of layers (no path around ``layer``) the
restricted gradients of all channels sum to the vanilla gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from surprise_monitor.monitor.probe.class_output import (
    DEFAULT_CLASS_OUTPUT,
    check_classes,
    class_output_of,
    logits_of,
)
from surprise_monitor.monitor.probe.hooks import LayerTap
from surprise_monitor.monitor.probe.layout import as_nchw, layout_for, split_layer


def input_gradient(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | int,
    channels: int | Sequence[int] | None = None,
    *,
    class_output: str = DEFAULT_CLASS_OUTPUT,
    output_to_logits: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``d score[b, classes[b]] / d x`` for a batch ``x`` ``[B, C, H, W]``, same shape as ``x``.

    Args:
        model: the CNN in eval mode (not modified; no parameter gradient is accumulated).
        layer: the target layer spec (its output a feature map: ``[B, N, H', W']``, or in
            another layout of :mod:`~surprise_monitor.monitor.probe.layout`).
        classes: the class whose score is differentiated, per sample (or one for all).
        channels: ``None`` for the vanilla gradient through every path; a filter index (or a
            list of them) for the gradient that flows only through those channels of ``layer``.
        class_output: ``"logit"``, ``"softmax"`` or ``"log_softmax"`` (use the table's).
    """
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first")
    if x.ndim != 4:
        raise ValueError(f"x must be a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    with torch.inference_mode(False):  # normal tensors, even in a caller's inference_mode
        x = x.detach().clone().requires_grad_(True)
        cls = torch.as_tensor(classes, dtype=torch.int64, device=x.device).reshape(-1).clone()
    if cls.numel() == 1 and x.shape[0] > 1:
        cls = cls.expand(x.shape[0])
    if cls.numel() != x.shape[0]:
        raise ValueError(f"{cls.numel()} classes for a batch of {x.shape[0]}")
    tap = LayerTap(model, layer, cut_graph=False)
    try:
        with tap.armed() as record, torch.inference_mode(False), torch.enable_grad():
            out = model(x)  # whatever the caller's mode: the graph runs from x through the layer
    finally:
        tap.close()
    activation = tap.activation(record)
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits_of(out, output_to_logits)
        check_classes(cls, logits.shape[1])
        total = class_output_of(
            logits, cls, class_output
        ).sum()  # samples are independent in eval mode
        if channels is None:
            (grad,) = torch.autograd.grad(total, x)
            return grad.detach()
        return _through_channels(total, activation, x, channels, layer)


def _through_channels(
    total: torch.Tensor,
    activation: torch.Tensor,
    x: torch.Tensor,
    channels: int | Sequence[int],
    layer: str,
) -> torch.Tensor:
    """The gradient of ``total`` reaching ``activation``, masked to ``channels`` and carried
    back to ``x``: ``(dA/dx)^T (dO/dA * mask)``."""
    layout = layout_for(activation, split_layer(layer)[1])
    n = as_nchw(activation, layout).shape[1]
    idx = torch.as_tensor(channels, dtype=torch.int64).reshape(-1)
    if idx.numel() == 0 or bool(((idx < 0) | (idx >= n)).any()):
        raise ValueError(f"channels must lie in [0, {n}) for layer {layer!r}, got {channels}")
    (g_layer,) = torch.autograd.grad(total, activation, retain_graph=True)
    mask = torch.zeros_like(g_layer)
    as_nchw(mask, layout)[:, idx.to(g_layer.device)] = 1.0  # the channels, in any layout
    (grad,) = torch.autograd.grad(activation, x, grad_outputs=g_layer * mask)
    return grad.detach()
