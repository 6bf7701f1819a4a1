"""One forward pass and one partial backward pass that yield a batch's activations and gradients.

The network runs under ``torch.no_grad()`` up to the target layer, so the prefix keeps no autograd
state. A :class:`~surprise_monitor.monitor.probe.hooks.LayerTap` on the target layer swaps its
output for a detached leaf that requires grad and turns grad mode on for the rest of the forward
pass (the head). One ``torch.autograd.grad`` call from the sum of the per-sample class scores to
that leaf then gives every sample's ``dO_c/dA`` at once: in eval mode samples do not interact, so
the gradient of the sum with respect to sample b's activation is sample b's own gradient. No
parameter gradient is computed or stored, no ``requires_grad`` flag is changed, and the hook does
nothing unless a probe call is active in the calling thread, so the plain model and other threads
are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surprise_monitor.monitor.probe.class_output import (
    DEFAULT_CLASS_OUTPUT,
    check_class_output,
    check_classes,
    class_output_of,
    logits_of,
)
from surprise_monitor.monitor.probe.hooks import LayerTap
from surprise_monitor.monitor.probe.layout import as_nchw, layout_for


class ModelRaised(Exception):
    """The watched model itself raised during a probe's forward pass (not the probe's hook):
    ``error`` is the model's own exception, for callers to re-raise as it would have been
    raised without the monitor."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"the model raised {type(error).__name__}: {error}")
        self.error = error


@dataclass
class ProbeResult:
    """What one probe pass produced (all tensors detached)."""

    output: Any  # the model's own output
    logits: torch.Tensor  # [B, K]
    classes: torch.Tensor  # [B] int64: the class each sample's gradient was taken for
    activation: torch.Tensor  # [B, N, H, W] the target layer's output (viewed so: layout.py)
    gradient: torch.Tensor  # [B, N, H, W] d score[b, classes[b]] / d activation


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def detach_tree(obj: Any) -> Any:
    """Detach every tensor in a nested tuple/list/dict output."""
    return map_tensors(torch.Tensor.detach, obj)


class GradAMapProbe:
    """Captures the target layer's activation and the class-score gradient for a batch.

    Args:
        model: the CNN, in eval mode.
        layer: name of the target module (see :func:`surprise_monitor.monitor.probe.resolve_layer`).
        class_output: the class output differentiated: ``"logit"`` (default), ``"softmax"`` or
            ``"log_softmax"``.
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        class_output: str = DEFAULT_CLASS_OUTPUT,
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.class_output = check_class_output(class_output)
        self.output_to_logits = output_to_logits
        self.tap = LayerTap(model, layer, cut_graph=True, on_output=self._layer_output)

    def close(self) -> None:
        """Remove the hook from the model (idempotent)."""
        self.tap.close()

    def _layer_output(self, output: Any) -> Any:
        """The target layer's output as the tap should see it (subclasses adapt it)."""
        return output

    def run(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, check_labels: bool = True
    ) -> ProbeResult:
        """Forward ``x`` once and backpropagate each sample's class score to the target layer.

        The class is ``labels[b]`` when given, else the predicted class. ``check_labels=False``
        skips the label range check (a host sync) for callers that check them themselves; the
        labels are then clamped to the model's classes (never an out-of-range index on the
        device). :class:`ModelRaised` (holding the model's exception) when the model's forward
        raises.
        """
        with self.tap.armed() as record:
            # normal tensors even inside a caller's inference_mode; no graph before the layer
            with torch.inference_mode(False), torch.no_grad():
                try:
                    output = self.model(x)
                except Exception as exc:
                    if exc is record.error:  # the tap's own check, not the model's
                        raise
                    raise ModelRaised(exc) from exc
        leaf = self.tap.activation(record)
        with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode
            logits = logits_of(output, self.output_to_logits)
            if not logits.requires_grad:
                raise RuntimeError(
                    f"the logits do not depend on layer {self.layer!r} through autograd "
                    "(does the model run its head under torch.no_grad()?)"
                )
            classes = self._classes(logits, labels, check_labels)
            total = class_output_of(logits, classes, self.class_output).sum()
            (gradient,) = torch.autograd.grad(total, leaf)
        layout = layout_for(leaf, self.tap.layout)
        activation, gradient = as_nchw(leaf.detach(), layout), as_nchw(gradient, layout)
        if layout != "nchw":  # one memory layout for the kernels
            activation, gradient = activation.contiguous(), gradient.contiguous()
        return ProbeResult(
            output=detach_tree(output),
            logits=logits.detach(),
            classes=classes,
            activation=activation,
            gradient=gradient,
        )

    @staticmethod
    def _classes(
        logits: torch.Tensor, labels: torch.Tensor | None, check_labels: bool
    ) -> torch.Tensor:
        """The class per sample: ``labels`` on the logits' device (checked against K, or clamped
        to it when ``check_labels`` is off), else the prediction."""
        if labels is None:
            return logits.detach().argmax(dim=1)
        classes = labels.to(device=logits.device, dtype=torch.int64)
        if classes.is_inference():  # made under inference_mode: cannot be saved
            classes = classes.clone()
        if check_labels:
            check_classes(classes, logits.shape[1])
        else:
            classes = classes.clamp(0, logits.shape[1] - 1)
        return classes
