"""The class score ``O_c`` whose gradient Grad-AMap uses: the one list of score names, and the
logits -> classes -> score steps shared by the probe and the input saliency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: The class scores a table can be calibrated on (``CalibrationTable.score``).
SCORES: tuple[str, ...] = ("logit", "softmax", "log_softmax")


def check_score(score: str) -> str:
    """``score`` itself, or ``ValueError`` when it is not one of :data:`SCORES`."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def logits_of(output: Any, output_to_logits: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The ``[B, K]`` logits in a model's output (``output_to_logits`` extracts them when the
    output is something else); ``ValueError`` when they are not a 2-D tensor."""
    logits = output_to_logits(output) if output_to_logits else output
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(
            "model output is not [B, K] logits; pass output_to_logits= to extract them"
        )
    return logits


def check_classes(classes: torch.Tensor, num_classes: int) -> None:
    """``ValueError`` naming the first class id outside ``[0, num_classes)`` (a host sync)."""
    bad = (classes < 0) | (classes >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"label {int(classes[bad][0])} is outside the model's {num_classes} classes "
            f"(classes must lie in [0, {num_classes}))"
        )


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
