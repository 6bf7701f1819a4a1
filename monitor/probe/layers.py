"""Choosing the target layer: the feature map the classifier head reads, or a named module.

``layer=None`` traces one forward pass (every module's output, in the order the modules finish)
and picks the output the head reads: the last feature map computed before the classifier, a
``[B, C, H, W]`` map, a channels-last ``[B, H, W, C]`` map or ``[B, T, C]`` tokens
(:mod:`~.layout`). The whole block's output is taken (a container finishes after the modules
inside it), so a conv inside a concatenation, a dense layer's growth branch or a depthwise conv
inside a block is never picked; a pooling module's output is traced back to the map it pools,
and a class-score map (SqueezeNet's classifier conv: as many channels as classes, no dense layer
after it) to the features it is computed from. The choice is checked against the head's first
layer (a dense layer or 1x1 conv reading ``C`` or ``C x H x W`` features); when it does not
match, the choice is refused naming the candidates. ``layer="final-conv"`` is the paper's rule:
the last ``nn.Conv2d`` executed (1x1 projection shortcuts skipped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from surprise_monitor.monitor.probe.hooks import LayerCall, get_module, traced_calls
from surprise_monitor.monitor.probe.layout import layer_spec, nchw_shape, split_layer

#: ``layer=`` value that asks for the paper's rule (the last convolution executed).
FINAL_CONV = "final-conv"
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_NCHW_MODULES = (nn.Conv2d, nn.BatchNorm2d, *_POOLS)
_LAST_DIM_MODULES = (nn.Linear, nn.LayerNorm)
#: Modules whose output is no feature map of their own: pass-throughs, attention probabilities.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                 nn.Softmax)  # fmt: skip


@dataclass(frozen=True)
class LayerChoice:
    """The layer whose activations Grad-AMap scores, how to read them, and why it was picked."""

    name: str  # the layer spec: the module's name, ":nhwc" after it for a channels-last map
    reason: str
    out_shape: tuple[int, ...]  # [N, H, W] for the example input (tokens: [N, T, 1])
    layout: str = "nchw"  # where the channels are (:mod:`~.layout`)


def resolve_layer(model: nn.Module, layer: str | None, example: torch.Tensor) -> LayerChoice:
    """Pick the target layer for ``model`` on an ``example`` batch.

    ``layer=None``: the feature map the classifier head reads (module docstring); a module name
    picks that module (``"name:nhwc"`` / ``"name:tokens"`` / ``"name:nchw"`` states its layout
    when its shape leaves it open); ``"final-conv"``: the paper's final convolution. The layer
    must run exactly once per forward pass.
    """
    if layer == FINAL_CONV:
        return _final_conv(model, example)
    if layer is not None:
        name, layout = split_layer(layer)
        return _named_layer(model, name, example, layout)
    return _head_input(model, example)


# ------------------------------------------------------------------ what a map looks like
def _spatial_ok(h: int, w: int, in_hw: tuple[int, ...]) -> bool:
    """Whether ``h x w`` positions can be a feature map of an ``in_hw`` image: more than one,
    no larger than the image, with its aspect ratio (up to rounding)."""
    if h * w <= 1 or len(in_hw) != 2 or h > in_hw[0] or w > in_hw[1]:
        return False
    stride = in_hw[1] / w
    expect = in_hw[0] / stride
    return abs(h - expect) <= max(1.0, 0.15 * expect)


def _shape_layouts(shape: tuple[int, ...], in_hw: tuple[int, ...], unit: bool = False) -> list[str]:
    """The layouts ``shape`` can have as a feature map of an ``in_hw`` image (``unit``: a
    ``[B, C, 1, 1]`` map counts too)."""
    if len(shape) == 3:
        return ["tokens"] if shape[1] > 1 else []
    if len(shape) != 4:
        return []
    if unit and shape[2] == shape[3] == 1 and shape[1] > 1:
        return ["nchw"]
    found = []
    if _spatial_ok(shape[2], shape[3], in_hw):
        found.append("nchw")
    if _spatial_ok(shape[1], shape[2], in_hw):
        found.append("nhwc")
    return found


def _consumer_layout(call: LayerCall, later: list[LayerCall]) -> str | None:
    """The layout the first layer reading ``call``'s output expects: channels first for a conv
    or 2-D batch norm, channels last for a dense layer or layer norm; ``None`` if unknown."""
    for other in later:
        if other.input_key == call.output_key and other.name != call.name:
            if isinstance(other.module, _NCHW_MODULES):
                return "nchw"
            if isinstance(other.module, _LAST_DIM_MODULES):
                return "nhwc"
    return None


def _layout_of(
    call: LayerCall, calls: list[LayerCall], in_hw: tuple[int, ...], unit: bool = False
) -> tuple[str | None, list[str]]:
    """``call``'s output layout as a feature map (``None``: not a map) and the layouts its shape
    alone allows (several: it was resolved by the modules producing or reading it); ``unit``:
    ``[B, C, 1, 1]`` maps count."""
    if isinstance(call.module, _PASS_THROUGH):  # hands on what another module computed
        return None, []
    options = _shape_layouts(call.out_shape, in_hw, unit)
    if len(options) <= 1:
        return (options[0] if options else None), options
    producers = [c for c in calls if c.output_key == call.output_key]
    if any(isinstance(c.module, _NCHW_MODULES) for c in producers):
        return "nchw", options
    if any(isinstance(c.module, _LAST_DIM_MODULES) for c in producers):
        return "nhwc", options
    return _consumer_layout(call, calls[calls.index(call) + 1 :]), options


def map_layout(call: LayerCall, calls: list[LayerCall], in_hw: tuple[int, ...]) -> str | None:
    """The layout of ``call``'s output as a feature map of an ``in_hw`` image (``None``: not a
    map, or its layout cannot be told)."""
    return _layout_of(call, calls, in_hw)[0]


def _describe(call: LayerCall, layout: str) -> str:
    """``'name' [C, H, W] (layout)`` for messages."""
    return f"{call.name!r} {list(call.out_shape[1:])} ({layout})"


# ------------------------------------------------------------------ the head's input
def _head_input(model: nn.Module, example: torch.Tensor) -> LayerChoice:
    """The feature map the classifier head reads (module docstring); when the example is so
    small that the network goes on past its last map larger than 1 x 1, the last 1 x 1 map."""
    names = [n for n, _ in model.named_modules() if n]
    calls = traced_calls(model, example, names)
    k = _num_classes(model, example)
    try:
        return _last_map(calls, example, k, unit=False)
    except _TrunkGoesOn as exc:
        try:
            choice = _last_map(calls, example, k, unit=True)
        except _TrunkGoesOn:
            raise ValueError(str(exc)) from None
        note = (f"; the example {list(example.shape[1:])} is small for this model: its last "
                "maps are 1 x 1")  # fmt: skip
        return LayerChoice(choice.name, choice.reason + note, choice.out_shape, choice.layout)


class _TrunkGoesOn(ValueError):
    """A spatial convolution runs after the chosen map."""


def _last_map(calls: list[LayerCall], example: torch.Tensor, k: int, unit: bool) -> LayerChoice:
    """The last map before the head among ``calls`` (``unit``: 1 x 1 maps count)."""
    runs = Counter(c.name for c in calls)
    in_hw = tuple(example.shape[2:])
    maps: list[tuple[int, LayerCall, str]] = []
    for i, call in enumerate(calls):
        layout, _ = _layout_of(call, calls, in_hw, unit)
        if layout is not None and runs[call.name] == 1 and call.out_shape[0] == example.shape[0]:
            maps.append((i, call, layout))
    if not maps:
        raise ValueError(
            "no module outputs a feature map ([B, C, H, W], [B, H, W, C] or [B, T, C] tokens) "
            "once per forward pass; name the target layer explicitly (layer=...)"
        )
    skipped: list[str] = []
    i, call, layout = maps[-1]
    if isinstance(call.module, _POOLS):  # the map it pools, unless it resizes what it pools
        source = _source_of(maps, call)
        if source is not None and source[1].out_shape == call.out_shape:
            skipped.append(f"{call.name!r} (a pooling of {source[1].name!r} that keeps its size)")
            i, call, layout = source
    if layout == "nchw" and k and call.out_shape[1] == k and not _dense_after(calls, i):
        i, call, layout = _class_map_source(maps, calls, call, k, skipped)
    i, call = _outermost(calls, runs, i, call)
    _check_trunk_ends(calls, i, call, example)
    head = _first_head_layer(calls, i)
    _check_head(call, layout, head, maps)
    reason = f"the feature map the classifier head reads: the last {layout} map before the head"
    if head is not None:
        reason += f" ({head.name!r}, {type(head.module).__name__} of {_head_width(head)} inputs)"
    if skipped:
        reason += "; skipped " + "; ".join(skipped)
    shape = nchw_shape(call.out_shape, layout)
    return LayerChoice(layer_spec(call.name, layout), reason, tuple(shape[1:]), layout)


def _num_classes(model: nn.Module, example: torch.Tensor) -> int:
    """The width of the model's ``[B, K]`` output (0 when it is not one tensor of that shape)."""
    with torch.no_grad():
        out = model(example)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else 0


def _source_of(
    maps: list[tuple[int, LayerCall, str]], call: LayerCall
) -> tuple[int, LayerCall, str] | None:
    """The last map whose output ``call`` reads, or ``None``."""
    for j, other, layout in reversed(maps):
        if other.output_key == call.input_key and other is not call:
            return j, other, layout
    return None


def _dense_after(calls: list[LayerCall], i: int) -> bool:
    """Whether a dense layer runs after call ``i``."""
    return any(isinstance(c.module, nn.Linear) for c in calls[i + 1 :])


def _class_map_source(
    maps: list[tuple[int, LayerCall, str]], calls: list[LayerCall], call: LayerCall, k: int,
    skipped: list[str],
) -> tuple[int, LayerCall, str]:  # fmt: skip
    """Back from a class-score map (``k`` channels, no dense layer after it) to the map of
    features its first layer reads (the class map itself when no module outputs those)."""
    current = call
    while True:
        producer = next(
            (c for c in calls if c.output_key == current.input_key and c.out_shape[1:2] == (k,)),
            None,
        )
        if producer is None or producer is current:
            break
        current = producer
    source = _source_of(maps, current)
    if source is None:
        return next((j, c, lay) for j, c, lay in maps if c is call)  # the only map there is
    skipped.append(
        f"{call.name!r} (a class-score map: {k} channels for {k} classes, computed from "
        f"{source[1].name!r} by {current.name!r})"
    )
    return source


def _outermost(
    calls: list[LayerCall], runs: Counter, i: int, call: LayerCall
) -> tuple[int, LayerCall]:
    """Of the modules that output the same tensor as call ``i``, the last to finish (the whole
    block rather than its last part) that runs once and computes it (a pass-through such as
    dropout in eval mode, or an in-place activation after the block, only hands it on)."""
    same = [(j, c) for j, c in enumerate(calls)
            if c.output_key == call.output_key and runs[c.name] == 1]  # fmt: skip
    computing = [(j, c) for j, c in same if c.input_key != c.output_key]
    return (computing or same or [(i, call)])[-1]


def _check_trunk_ends(
    calls: list[LayerCall], i: int, call: LayerCall, example: torch.Tensor
) -> None:
    """``ValueError`` when a spatial convolution (a kernel or stride over 1) runs after the chosen
    map: the network goes on past it at 1 x 1, so the example is smaller than the model needs."""
    for other in calls[i + 1 :]:
        m = other.module
        if isinstance(m, nn.Conv2d) and (max(m.kernel_size) > 1 or max(m.stride) > 1):
            raise _TrunkGoesOn(
                f"the last feature map larger than 1 x 1 is {call.name!r} {list(call.out_shape)}, "
                f"but convolution {other.name!r} runs after it: the example "
                f"{list(example.shape[1:])} is too small for this model (its last maps are "
                "1 x 1); calibrate at the model's input size, or name the layer (layer=...)"
            )


def _first_head_layer(calls: list[LayerCall], i: int) -> LayerCall | None:
    """The first dense layer or convolution to run after call ``i`` (the head's first layer)."""
    return next((c for c in calls[i + 1 :] if isinstance(c.module, nn.Linear | nn.Conv2d)), None)


def _head_width(head: LayerCall) -> int:
    """How many features the head's first layer reads."""
    m = head.module
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def _check_head(
    call: LayerCall, layout: str, head: LayerCall | None, maps: list[tuple[int, LayerCall, str]]
) -> None:
    """``ValueError`` naming candidates when the head's first layer does not read ``C`` (pooled)
    or ``C x positions`` (flattened) features of the chosen map."""
    if head is None:
        return
    shape = nchw_shape(call.out_shape, layout)
    c, positions = shape[1], shape[2] * shape[3]
    width = _head_width(head)
    if width in (c, c * positions):
        return
    seen: list[str] = []
    for _, other, other_layout in reversed(maps):
        text = _describe(other, other_layout)
        if text not in seen:
            seen.append(text)
        if len(seen) == 3:
            break
    raise ValueError(
        f"cannot tell which feature map the classifier reads: the last one, "
        f"{_describe(call, layout)}, has {c} channels but the head's first layer {head.name!r} "
        f"reads {width} features; candidates: {', '.join(seen)}; name one (layer=...)"
    )


# ------------------------------------------------------------------ a named layer
def _named_layer(
    model: nn.Module, layer: str, example: torch.Tensor, layout: str | None
) -> LayerChoice:
    """The caller's layer, checked: it runs exactly once and outputs a feature map whose layout
    its shape (or the modules around it, or the caller's ``:layout``) settles."""
    get_module(model, layer)
    names = [n for n, _ in model.named_modules() if n]
    calls = traced_calls(model, example, names)
    mine = [c for c in calls if c.name == layer]
    if len(mine) != 1:
        raise ValueError(
            f"layer {layer!r} ran {len(mine)} times in one forward pass; "
            "pick a module that runs exactly once"
        )
    call = mine[0]
    shape = call.out_shape
    if len(shape) not in (3, 4):
        raise ValueError(
            f"layer {layer!r} outputs shape {shape}; Grad-AMap needs a feature map: "
            "[B, C, H, W], [B, H, W, C] or [B, T, C] tokens (a 4-D activation)"
        )
    found, options = _layout_of(call, calls, tuple(example.shape[2:]))
    if layout is None:
        layout = found or ("tokens" if len(shape) == 3 else None)
        if layout is None and len(shape) == 4 and not options:
            layout = "nchw"  # not spatial in either reading: the conv convention
        if layout is None:
            raise ValueError(
                f"layer {layer!r} outputs {shape}: its channel axis is ambiguous (as "
                f"[B, C, H, W] it has {shape[1]} channels, as [B, H, W, C] {shape[3]}); "
                f"name the layout: layer='{layer}:nchw' or layer='{layer}:nhwc'"
            )
    elif (layout == "tokens") != (len(shape) == 3):
        raise ValueError(f"layer {layer!r} outputs {shape}, not a {layout} activation")
    how = "named by the caller" + (f" ({layout})" if layout != "nchw" else "")
    shape = nchw_shape(shape, layout)
    return LayerChoice(layer_spec(layer, layout), how, tuple(shape[1:]), layout)


# ------------------------------------------------------------------ the paper's rule
def _final_conv(model: nn.Module, example: torch.Tensor) -> LayerChoice:
    """The last convolution call that runs once and is not a 1x1 projection shortcut."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no nn.Conv2d; name the target layer explicitly (layer=...)")
    calls = traced_calls(model, example, convs)
    runs = Counter(c.name for c in calls)
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
