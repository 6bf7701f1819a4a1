"""Each calibration batch's alpha: the monitor's probe run over training images with their true
labels.

:class:`BatchAlpha` chooses the target layer on the first batch (or takes the checkpoint's),
runs the prefix in ``torch.inference_mode`` where the model allows it (falling back to the plain
probe), optionally under autocast, and checks what it computes: one input size, one class count
and indices that fit the table's int32 at once (shapes and host data); finite images, labels
of the model's classes and finite alpha on the host copy of the results (:meth:`BatchAlpha.check`,
on the writer thread: no host sync in the calibration loop).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from surprise_monitor.calibrate.checkpoint import CheckpointError
from surprise_monitor.calibrate.inference_probe import InferenceModeProbe, InferenceModeUnsupported
from surprise_monitor.calibrate.writer import PendingBatch
from surprise_monitor.kernels import grad_amap
from surprise_monitor.monitor.probe import GradAMapProbe, ProbeResult, resolve_layer
from surprise_monitor.monitor.probe.grad_amap_probe import ModelRaised

log = logging.getLogger(__name__)


@dataclass
class RunMeta:
    """What the first batch told about the model (recorded in checkpoints, same on all ranks)."""

    layer: str
    layer_reason: str
    num_filters: int
    input_shape: list[int]  # [C, H, W]
    num_classes: int | None = None  # known once the model has run

    def as_json(self) -> dict[str, Any]:
        """The JSON object a checkpoint manifest stores."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> RunMeta | None:
        """The meta a manifest (or a broadcast) holds; ``None`` stays ``None``."""
        return None if obj is None else cls(**obj)


class BatchAlpha:
    """Computes alpha ``[B, N]`` for batches of training images with their true labels.

    Args:
        model: the CNN in eval mode.
        layer: the requested target layer (``None``: the final convolution).
        class_output: the class output differentiated.
        device: where the model runs (for autocast).
        backend: the ``grad_amap`` kernel backend.
        amp: autocast (float16 on CUDA, bfloat16 on CPU); alpha still accumulates in float32.
        inference_mode: run the prefix in inference mode where the model allows it.
        meta: a checkpoint's meta (the layer is then the checkpoint's).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        class_output: str,
        device: torch.device,
        backend: str,
        *,
        amp: bool,
        inference_mode: bool,
        meta: RunMeta | None = None,
    ) -> None:
        self.model, self.layer, self.class_output, self.device = model, layer, class_output, device
        self.backend, self.amp, self.inference_mode = backend, amp, inference_mode
        self.meta = meta
        self.probe: GradAMapProbe | None = None

    def close(self) -> None:
        """Remove the probe's hooks (idempotent)."""
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> np.ndarray:
        """Alpha ``[B, N]`` (float32, on the CPU) of a batch on the device, checked."""
        pending = self.compute(x, y, idx)
        pending.wait()
        return self.check(pending)

    def compute(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> PendingBatch:
        """Start a batch: alpha on the device, its copy to the host under way (no host sync;
        the value checks are :meth:`check`'s)."""
        images_finite = torch.isfinite(x).all()
        if self.probe is None:
            self._start(x)
        elif list(x.shape[1:]) != self.meta.input_shape:
            raise ValueError(
                f"images {idx[0]}..{idx[-1]} have shape {tuple(x.shape[1:])}, earlier ones "
                f"{tuple(self.meta.input_shape)}: calibrate at one input size"
            )
        res = self._probe(x, y)
        k = int(res.logits.shape[1])
        if self.meta.num_classes is None:
            self.meta.num_classes = k
        elif self.meta.num_classes != k:
            raise ValueError(f"the model gave {k} classes, earlier {self.meta.num_classes}")
        if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
            raise ValueError(f"dataset index {idx.max()} does not fit the table's int32")
        alpha = grad_amap(res.activation, res.gradient, backend=self.backend)
        return PendingBatch.start(alpha, y, images_finite, idx)

    def check(self, batch: PendingBatch) -> np.ndarray:
        """A batch's alpha ``[B, N]`` on the host, once its images, labels and alpha are
        checked (``ValueError`` naming the images otherwise)."""
        idx = batch.indices
        if not bool(batch.images_finite):
            raise ValueError(f"images {idx[0]}..{idx[-1]} contain NaN or Inf")
        labels = batch.labels.numpy()
        k = int(self.meta.num_classes or 0)
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise ValueError(
                f"label {int(labels[bad][0])} is outside the model's {k} classes "
                f"(classes must lie in [0, {k}))"
            )
        alpha = batch.alpha.numpy()
        if not np.isfinite(alpha).all():
            raise ValueError(f"alpha is not finite for images {idx[0]}..{idx[-1]}")
        return alpha

    def _start(self, x: torch.Tensor) -> None:
        """Choose the layer on the first batch (the checkpoint's, if resumed) and attach the
        probe."""
        want = self.meta.layer if self.meta else self.layer
        choice = resolve_layer(self.model, want, x[:1])
        if self.meta is None:
            log.info("calibrate: target layer %r (%s)", choice.name, choice.reason)
            self.meta = RunMeta(
                choice.name, choice.reason, int(choice.out_shape[0]), list(x.shape[1:])
            )
        elif int(choice.out_shape[0]) != self.meta.num_filters:
            raise CheckpointError(
                f"layer {choice.name!r} has {choice.out_shape[0]} filters, the checkpoint "
                f"{self.meta.num_filters}"
            )
        probe = InferenceModeProbe if self.inference_mode else GradAMapProbe
        self.probe = probe(self.model, choice.name, class_output=self.class_output)

    def _probe(self, x: torch.Tensor, y: torch.Tensor) -> ProbeResult:
        """One probe pass under autocast when asked; falls back to the plain probe for good
        when the model's head cannot run with the prefix in inference mode."""
        try:
            return self._forward(x, y)
        except InferenceModeUnsupported as exc:
            log.info("calibrate: prefix in no_grad instead of inference_mode (%s)", exc)
            self.close()
            self.probe = GradAMapProbe(self.model, self.meta.layer, class_output=self.class_output)
            return self._forward(x, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> ProbeResult:
        """The probe's pass, under autocast when ``amp`` is on."""
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        try:
            with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
                return self.probe.run(x, labels=y, check_labels=False)  # checked by check()
        except ModelRaised as exc:
            error = exc.error  # the model's own error, as the caller would get it without us
        raise error
