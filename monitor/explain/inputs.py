"""The one image an explanation or a fix is about, judged on the model's device."""

from __future__ import annotations

from typing import Any

import torch

from surprise_monitor.monitor.judge import Judge
from surprise_monitor.monitor.loading.models import model_device, model_dtype
from surprise_monitor.monitor.report import MonitorReport


def one_image(x: Any, what: str) -> torch.Tensor:
    """``x`` as a ``[1, C, H, W]`` batch; ``TypeError`` / ``ValueError`` naming ``what`` (the
    function that takes it) for anything but one image."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"{what} takes one image: one [C, H, W] or [1, C, H, W] tensor, got {tuple(x.shape)}"
        )
    return x


def judged_on_device(
    judge: Judge, x: torch.Tensor, label: int | None
) -> tuple[torch.Tensor, MonitorReport]:
    """``x`` moved to the model's device and floating dtype (a ``model.half()`` takes float16),
    and the judge's report of it against ``label`` (else the prediction). Nothing is recorded
    anywhere: explaining is not monitoring."""
    x = x.to(model_device(judge.model), model_dtype(judge.model))
    with torch.inference_mode(False):  # normal label tensors, even in a caller's inference_mode
        labels = None if label is None else torch.tensor([int(label)])
        return x, judge(x, labels)
