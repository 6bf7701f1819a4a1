"""Choosing the target layer: the final convolution, as the paper does, or a named module."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerChoice:
    """The layer whose activations Grad-AMap scores, and why it was picked."""

    name: str
    reason: str
    out_shape: tuple[int, ...]  # [N, H, W] for the example input


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error with close matches if there is none."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"model has no module named {name!r}{hint}")


@dataclass
class _Call:
    name: str
    module: nn.Module
    input_key: tuple
    out_shape: tuple[int, ...]
    keep_alive: torch.Tensor | None  # holds the input so its address cannot be reused


def _trace_calls(model: nn.Module, example: torch.Tensor, names: list[str]) -> list[_Call]:
    modules = dict(model.named_modules())
    calls: list[_Call] = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            key = (x.data_ptr(), tuple(x.shape), x.stride()) if x is not None else (id(module),)
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            calls.append(_Call(name, module, key, shape, x))

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def resolve_layer(model: nn.Module, layer: str | None, example: torch.Tensor) -> LayerChoice:
    """Pick the target layer for ``model`` on an ``example`` batch.

    ``layer=None`` picks the last ``nn.Conv2d`` executed in a forward pass, skipping a 1x1
    projection shortcut (a 1x1 convolution that reads the same tensor as an earlier convolution,
    i.e. a parallel branch of a residual block) and convolutions that run more than once.
    A module name picks that module; its output must be a 4-D ``[B, N, H, W]`` tensor and it must
    run exactly once per forward pass.
    """
    if layer is not None:
        get_module(model, layer)
        calls = _trace_calls(model, example, [layer])
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

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no nn.Conv2d; name the target layer explicitly (layer=...)")
    calls = _trace_calls(model, example, convs)
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
