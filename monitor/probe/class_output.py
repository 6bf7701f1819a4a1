"""The class output ``O_c`` whose gradient Grad-AMap uses (the paper's "class score"; here
*class output*, so that *score* means only the alarm's atypicality score): the one list of
their names, and the logits -> classes -> output steps shared by the probe and the saliency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from surprise_monitor.monitor.checks import one_of

#: The class outputs a table can be calibrated on (``CalibrationTable.class_output``).
CLASS_OUTPUTS: tuple[str, ...] = ("logit", "softmax", "log_softmax")
#: The default: the logit (the paper's class score).
DEFAULT_CLASS_OUTPUT = "logit"


def check_class_output(class_output: str) -> str:
    """``class_output`` itself, or ``ValueError`` when it is not one of :data:`CLASS_OUTPUTS`."""
    return one_of("class_output", class_output, CLASS_OUTPUTS)


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


def class_output_of(logits: torch.Tensor, classes: torch.Tensor, class_output: str) -> torch.Tensor:
    """Per-sample output O_c of the chosen class: the logit, softmax or log-softmax."""
    check_class_output(class_output)
    if class_output == "logit":
        s = logits
    elif class_output == "softmax":
        s = torch.softmax(logits, dim=1)
    else:
        s = torch.log_softmax(logits, dim=1)
    return s.gather(1, classes.view(-1, 1)).squeeze(1)
