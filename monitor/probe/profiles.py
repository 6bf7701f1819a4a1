"""Activation profiles: each channel's spatial mean at a few early layers, for the alarm score.

The paper's quantities live at the final convolution. Inputs unlike the training images in their
low-level statistics (greyscale digits on a black background, noise, heavy blur or low contrast)
are seen most clearly by the first stages of the network. :class:`ProfileTap` records, during
the same forward pass the probe makes, the mean over H x W of every channel at those layers
(``[B, C]`` float32 per layer): a forward hook that reads the output and changes nothing, so the
cost is one reduction per layer. :func:`stage_layers` picks the layers: the output of the last
module run at each of the first ``count`` spatial resolutions (for a torchvision ResNet at
224 x 224: ``relu`` at 112 x 112 and ``layer1`` at 56 x 56; for a CIFAR ResNet: ``layer1`` and
``layer2``). :func:`head_layer` picks the alarm's head layer: the last feature map before the
classifier (``layer4`` of a ResNet), whose channel means the Mahalanobis component reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from surprise_monitor.monitor.probe.hooks import CopySafeHook, get_module, traced_calls
from surprise_monitor.monitor.probe.layers import map_layout, resolve_layer
from surprise_monitor.monitor.probe.layout import as_nchw, layer_spec, nchw_shape, split_layer

#: How many of the first spatial stages :func:`stage_layers` picks by default.
DEFAULT_STAGES = 2


class ProfileTap:
    """Forward hooks on ``layers`` of ``model`` that record each channel's spatial mean while
    armed in the calling thread (other threads and the plain model are unaffected).

    Args:
        model: the network (not modified; :meth:`close` removes the hooks).
        layers: module names whose outputs are ``[B, C, H, W]`` tensors run once per pass.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.layers = tuple(layers)
        self._local = threading.local()
        self._handles: list[Any] = []
        try:
            for name in self.layers:
                hook = CopySafeHook(self._make_hook(name))
                self._handles.append(get_module(model, name).register_forward_hook(hook))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def armed(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the layers' channel means (``{layer: [B, C] float32}``) in this thread for the
        duration of the block."""
        record: dict[str, torch.Tensor] = {}
        self._local.record = record
        try:
            yield record
        finally:
            self._local.record = None

    def means(self, record: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The recorded means in the order of :attr:`layers` (``RuntimeError`` naming a layer
        that did not run)."""
        missing = [name for name in self.layers if name not in record]
        if missing:
            raise RuntimeError(f"profile layer(s) {missing} did not run in the forward pass")
        return [record[name] for name in self.layers]

    def _make_hook(self, name: str) -> Any:
        """The hook that records layer ``name``'s channel means."""

        layout = split_layer(name)[1]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            record = getattr(self._local, "record", None)
            if record is None:
                return
            if name in record:
                raise RuntimeError(
                    f"profile layer {name!r} ran more than once in one forward pass; pick a "
                    "module that runs exactly once"
                )
            if not isinstance(output, torch.Tensor) or output.ndim not in (3, 4):
                raise ValueError(f"profile layer {name!r} output is not a feature map")
            record[name] = as_nchw(output.detach(), layout).float().mean(dim=(2, 3))

        return hook


def _runs(calls: Sequence[Any]) -> dict[str, int]:
    """How many times each traced module ran."""
    runs: dict[str, int] = {}
    for call in calls:
        runs[call.name] = runs.get(call.name, 0) + 1
    return runs


def head_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The feature map the classifier head reads (the layer spec
    :func:`~surprise_monitor.monitor.probe.layers.resolve_layer` picks by default: ``layer4`` of
    a torchvision ResNet, the final tokens of a ViT). ``ValueError`` when there is none."""
    try:
        return resolve_layer(model, None, example).name
    except ValueError as exc:
        raise ValueError(
            f"{exc}; or pass head_layer='none' (or --head-layer none) for no head component"
        ) from None


def stage_layers(
    model: nn.Module, example: torch.Tensor, count: int = DEFAULT_STAGES, *, before: str = ""
) -> list[str]:
    """The output of the last module run at each of the first ``count`` spatial resolutions of a
    forward pass of ``example`` (``[1, C, H, W]``), in the order they run.

    Modules that run more than once, any that finish after ``before`` (the monitored layer) and
    any that output the monitored map itself are left out; a resolution of 1 x 1 is not a stage,
    and neither are tokens or tensors that are no map of the image (attention's
    ``[B, heads, T, d]``). Channels-last maps are named with their ``":nhwc"`` spec.
    """
    names = [n for n, _ in model.named_modules() if n]
    calls = traced_calls(model, example, names)
    runs = _runs(calls)
    stop = split_layer(before)[0] if before else ""
    monitored = next((c.output_key for c in calls if c.name == stop), None)
    order: list[tuple[int, int]] = []  # resolutions in the order they first appear
    last: dict[tuple[int, int], str] = {}
    for call in calls:
        if stop and call.name == stop:
            break
        if call.output_key == monitored:  # the monitored map itself, under another name
            continue
        layout = map_layout(call, calls, tuple(example.shape[2:]))
        if layout not in ("nchw", "nhwc") or runs[call.name] != 1:
            continue
        shape = nchw_shape(call.out_shape, layout)
        res = (int(shape[2]), int(shape[3]))
        if res not in last:
            order.append(res)
        last[res] = layer_spec(call.name, layout)
    return [last[res] for res in order[:count]]
