"""Choosing the target layer: the final convolution, as the paper does, or a named module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surprise_monitor.monitor.probe.hooks import LayerCall, get_module, traced_calls


@dataclass(frozen=True)
class LayerChoice:
    """The layer whose activations Grad-AMap scores, and why it was picked."""

    name: str
    reason: str
    out_shape: tuple[int, ...]  # [N, H, W] for the example input


def resolve_layer(model: nn.Module, layer: str | None, example: torch.Tensor) -> LayerChoice:
    """Pick the target layer for ``model`` on an ``example`` batch.

    ``layer=None`` picks the last ``nn.Conv2d`` executed in a forward pass, skipping a 1x1
    projection shortcut (a 1x1 convolution that reads the same tensor as an earlier convolution,
    i.e. a parallel branch of a residual block) and convolutions that run more than once.
    A module name picks that module; its output must be a 4-D ``[B, N, H, W]`` tensor and it must
    run exactly once per forward pass.
    """
    if layer is not None:
        return _named_layer(model, layer, example)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no nn.Conv2d; name the target layer explicitly (layer=...)")
    return _final_conv(traced_calls(model, example, convs))


def _named_layer(model: nn.Module, layer: str, example: torch.Tensor) -> LayerChoice:
    """The caller's layer, checked: it runs exactly once and outputs ``[B, N, H, W]``."""
    get_module(model, layer)
    calls = traced_calls(model, example, [layer])
    if len(calls) != 1:
        raise ValueError(
            f"layer {layer!r} ran {len(calls)} times in one forward pass; "
            "pick a module that runs exactly once"
        )
    if len(calls[0].out_shape) != 4:
        raise ValueError(
            f"layer {layer!r} outputs shape {calls[0].out_shape}; Grad-AMap needs a 4-D "
            "[B, N, H, W] activation"
        )
    return LayerChoice(layer, "named by the caller", calls[0].out_shape[1:])


def _final_conv(calls: list[LayerCall]) -> LayerChoice:
    """The last convolution call that runs once and is not a 1x1 projection shortcut."""
    runs: dict[str, int] = {}
    for c in calls:
        runs[c.name] = runs.get(c.name, 0) + 1
    skipped: list[str] = []
    for i in range(len(calls) - 1, -1, -1):
        call = calls[i]
        if runs[call.name] > 1:
            skipped.append(f"{call.name!r} runs {runs[call.name]} times per forward pass")
            continue
        sibling = next((e for e in calls[:i] if e.input_key == call.input_key), None)
        if sibling is not None and call.module.kernel_size == (1, 1):
            skipped.append(
                f"{call.name!r} ran later but is a 1x1 projection shortcut reading the same "
                f"input as {sibling.name!r}"
            )
            continue
        reason = "last nn.Conv2d executed in a forward pass (the paper's final convolution layer)"
        if skipped:
            reason += "; skipped " + "; ".join(skipped)
        return LayerChoice(call.name, reason, call.out_shape[1:])
    raise ValueError("no convolution qualifies as the final layer: " + "; ".join(skipped))
