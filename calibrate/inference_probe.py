"""A :class:`~surprise_monitor.monitor.probe.GradAMapProbe` that runs the prefix in
``torch.inference_mode``.

``inference_mode`` skips the version-counter and view bookkeeping that ``no_grad`` still does,
so the layers before the target layer run a little cheaper. A pre-hook on the model enters
inference mode when a probe pass starts; the target layer's hook leaves it and clones the
layer's output (an inference tensor) into a normal tensor, from which the head is recorded as
in the plain probe. The values are the same as the plain probe's, bit for bit.

A model whose head reuses a tensor made before the target layer in an operation that saves it
for backward (a convolution on a skip connection after the target layer, for instance) cannot
run this way: :meth:`run` raises :class:`InferenceModeUnsupported`, and the caller falls back to
the plain probe.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from surprise_monitor.monitor.errors import SurpriseMonitorError
from surprise_monitor.monitor.probe import GradAMapProbe, ProbeResult
from surprise_monitor.monitor.probe.grad_amap_probe import ModelRaised
from surprise_monitor.monitor.probe.hooks import CopySafeHook


class InferenceModeUnsupported(SurpriseMonitorError, RuntimeError):
    """The model's head needs a tensor from before the target layer for its backward pass."""


class InferenceModeProbe(GradAMapProbe):
    """Same interface and results as :class:`GradAMapProbe`; the prefix runs in inference mode."""

    def __init__(self, model: nn.Module, layer: str, **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        self._guards = threading.local()  # per thread: entered (bool), guard (or None)
        self._pre: Any = model.register_forward_pre_hook(CopySafeHook(self._enter))

    def close(self) -> None:
        """Remove both hooks (idempotent)."""
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        super().close()

    def _enter(self, module: nn.Module, inputs: Any) -> None:
        """The model's pre-hook: enter inference mode at the start of a probe pass."""
        local = self._guards
        if not self.tap.is_armed() or getattr(local, "entered", True):
            return
        local.entered = True
        guard = torch._C._InferenceMode(True)
        guard.__enter__()
        local.guard = guard

    def _leave(self) -> None:
        """Leave inference mode, if this thread is in it."""
        guard = getattr(self._guards, "guard", None)
        if guard is not None:
            self._guards.guard = None
            guard.__exit__(None, None, None)

    def _layer_output(self, output: Any) -> Any:
        """At the target layer: leave inference mode (back to the caller's no_grad state, so
        the head is recorded normally) with a normal-tensor copy of the layer's output."""
        if getattr(self._guards, "guard", None) is not None:
            self._leave()
            if isinstance(output, torch.Tensor):
                output = output.clone()  # a normal tensor, not an inference tensor
        return output

    def run(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, *, check_labels: bool = True
    ) -> ProbeResult:
        """:meth:`GradAMapProbe.run` with the prefix in inference mode;
        :class:`InferenceModeUnsupported` when the head cannot run that way."""
        grad = torch.is_grad_enabled()
        self._guards.entered = False
        try:
            return super().run(x, labels, check_labels=check_labels)
        except (RuntimeError, ModelRaised) as exc:
            error = exc.error if isinstance(exc, ModelRaised) else exc
            if "Inference tensors" in str(error):
                raise InferenceModeUnsupported(str(error)) from exc
            raise
        finally:
            self._guards.entered = True
            self._leave()
            torch.set_grad_enabled(grad)
