"""One forward pass and one partial backward pass that yield a batch's activations and gradients.

The network runs under ``torch.no_grad()`` up to the target layer, so the prefix keeps no autograd
state. A forward hook on the target layer swaps its output for a detached leaf that requires
grad and turns grad mode on for the rest of the forward pass (the head). One
``torch.autograd.grad`` call from the sum of the per-sample class scores to that leaf then gives
every sample's ``dO_c/dA`` at once: in eval mode samples do not interact, so the gradient of the
sum with respect to sample b's activation is sample b's own gradient. No parameter gradient is
computed or stored, no ``requires_grad`` flag is changed, and the hook does nothing unless a probe
call is active in the calling thread, so the plain model and other threads are unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monitor.layers import get_module

SCORES = ("logit", "softmax", "log_softmax")


@dataclass
class ProbeResult:
    """What one probe pass produced (all tensors detached)."""

    output: Any  # the model's own output
    logits: torch.Tensor  # [B, K]
    classes: torch.Tensor  # [B] int64: the class each sample's gradient was taken for
    activation: torch.Tensor  # [B, N, H, W] the target layer's output
    gradient: torch.Tensor  # [B, N, H, W] d score[b, classes[b]] / d activation


class _Pass:
    __slots__ = ("leaf", "calls")

    def __init__(self) -> None:
        self.leaf: torch.Tensor | None = None
        self.calls = 0


def class_scores(logits: torch.Tensor, classes: torch.Tensor, score: str) -> torch.Tensor:
    """Per-sample score O_c of the chosen class: the logit, softmax or log-softmax."""
    if score == "logit":
        s = logits
    elif score == "softmax":
        s = torch.softmax(logits, dim=1)
    elif score == "log_softmax":
        s = torch.log_softmax(logits, dim=1)
    else:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return s.gather(1, classes.view(-1, 1)).squeeze(1)


def detach_tree(obj: Any) -> Any:
    """Detach every tensor in a nested tuple/list/dict output."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple | list):
        return type(obj)(detach_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    return obj


class GradAMapProbe:
    """Captures the target layer's activation and the class-score gradient for a batch.

    Args:
        model: the CNN, in eval mode.
        layer: name of the target module (see :func:`monitor.layers.resolve_layer`).
        score: ``"logit"`` (default), ``"softmax"`` or ``"log_softmax"``.
        output_to_logits: maps the model's output to ``[B, K]`` logits (default: identity).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        score: str = "logit",
        output_to_logits: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.model = model
        self.layer = layer
        self.score = score
        self.output_to_logits = output_to_logits
        self._local = threading.local()
        self._handle = get_module(model, layer).register_forward_hook(self._hook)

    def close(self) -> None:
        """Remove the hook from the model (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        state: _Pass | None = getattr(self._local, "state", None)
        if state is None:
            return None
        state.calls += 1
        if state.calls > 1:
            raise RuntimeError(
                f"layer {self.layer!r} ran more than once in one forward pass; "
                "pick a module that runs exactly once"
            )
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise ValueError(f"layer {self.layer!r} output {shape} is not a [B, N, H, W] tensor")
        leaf = output.detach().requires_grad_(True)
        state.leaf = leaf
        torch.set_grad_enabled(True)  # record the head only; the caller's no_grad restores it
        # A clone, so in-place ops downstream (ReLU(inplace=True)) cannot overwrite A.
        return leaf.clone()

    def run(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ProbeResult:
        """Forward ``x`` once and backpropagate each sample's class score to the target layer.

        The class is ``labels[b]`` when given, else the predicted class.
        """
        if self._handle is None:
            raise RuntimeError("probe is closed")
        state = _Pass()
        self._local.state = state
        try:  # normal tensors even inside a caller's inference_mode; no graph before the layer
            with torch.inference_mode(False), torch.no_grad():
                output = self.model(x)
        finally:
            self._local.state = None
        if state.leaf is None:
            raise RuntimeError(f"layer {self.layer!r} did not run in the forward pass")
        with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode
            logits = self.output_to_logits(output) if self.output_to_logits else output
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise ValueError(
                    "model output is not [B, K] logits; pass output_to_logits= to extract them"
                )
            if not logits.requires_grad:
                raise RuntimeError(
                    f"the logits do not depend on layer {self.layer!r} through autograd "
                    "(does the model run its head under torch.no_grad()?)"
                )
            if labels is None:
                classes = logits.detach().argmax(dim=1)
            else:
                classes = labels.to(device=logits.device, dtype=torch.int64)
                if classes.is_inference():  # made under inference_mode: cannot be saved
                    classes = classes.clone()
                k = logits.shape[1]
                bad = (classes < 0) | (classes >= k)
                if bool(bad.any()):
                    raise ValueError(
                        f"label {int(classes[bad][0])} is outside the model's {k} classes"
                    )
            score = class_scores(logits, classes, self.score).sum()
            (gradient,) = torch.autograd.grad(score, state.leaf)
        return ProbeResult(
            output=detach_tree(output),
            logits=logits.detach(),
            classes=classes,
            activation=state.leaf.detach(),
            gradient=gradient,
        )
