"""Explanation methods, each giving a non-negative saliency map ``[H, W]`` for one image.

- ``monitor``: :func:`surprise_monitor.monitor.explain` against the true label; the map is
  ``max_c |gradient|`` of the filter-restricted input gradient, and the explanation's top region
  (``mask``; empty = no region) is scored too;
- ``gradcam`` / ``gradcam++``: pytorch-grad-cam at ``model.layer4`` for the true class (the CAM
  upsampled to the image);
- ``gradient``: Captum's ``Saliency`` (``|d score / d x|``, max over channels).

The baselines run on a copy of the model, so the monitor's hooks never see their passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import Saliency
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain import explain

BASELINES = ("gradcam", "gradcam++", "gradient")


@dataclass
class MonitorView:
    """What the monitor's explanation says about one image."""

    saliency: np.ndarray  # [H, W] max_c |gradient|
    region: np.ndarray  # [H, W] bool, the top region (empty: no region)
    segments: np.ndarray  # [H, W] the SLIC superpixels of the explanation
    has_region: bool
    fired: bool


def monitor_view(monitor: SurpriseMonitor, x: torch.Tensor, label: int) -> MonitorView:
    """The monitor's explanation of ``x`` (``[3, H, W]``, normalised) against ``label``."""
    e = explain(monitor, x, label=label, exemplars_k=0)
    return MonitorView(
        saliency=np.abs(e.gradient).max(axis=0), region=e.mask.astype(bool),
        segments=e.segments, has_region=e.has_region, fired=e.fired,
    )  # fmt: skip


#: Grad-CAM's layer per strong model: the last convolutional block's output.
CAM_LAYERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet18": lambda m: m.layer4,
    "vgg_bn": lambda m: m.features[-1],  # the ReLU after the final conv-BN (features.24-25)
    "vgg_plain": lambda m: m.features[-1],  # the ReLU after the final conv (features.17)
    "mobilenet": lambda m: m.head,  # the 1x1 head conv-BN-ReLU6 (head.0 the final conv)
}


class Baselines:
    """Grad-CAM, Grad-CAM++ and the vanilla gradient on a private copy of ``model`` (Grad-CAM
    on the layer ``cam_layer`` picks; ``layer4`` by default, the ResNet's)."""

    def __init__(
        self, model: nn.Module, cam_layer: Callable[[nn.Module], nn.Module] | None = None
    ) -> None:
        self.model = copy.deepcopy(model).eval()
        layers = [(cam_layer or CAM_LAYERS["resnet18"])(self.model)]
        self.cams = {"gradcam": GradCAM(self.model, layers),
                     "gradcam++": GradCAMPlusPlus(self.model, layers)}  # fmt: skip
        self.saliency = Saliency(self.model)

    def maps(self, x: torch.Tensor, label: int) -> dict[str, np.ndarray]:
        """``{method: [H, W] saliency}`` for ``x`` (``[3, H, W]``) and the true ``label``."""
        out = {}
        for name, cam in self.cams.items():
            found = cam(input_tensor=x[None], targets=[ClassifierOutputTarget(label)])
            out[name] = np.nan_to_num(np.asarray(found[0], dtype=np.float64)).clip(min=0)
        grad = self.saliency.attribute(x[None].clone().requires_grad_(True), target=label)
        out["gradient"] = grad[0].abs().amax(dim=0).detach().numpy().astype(np.float64)
        return out


def random_superpixel_chance(segments: np.ndarray, mask: np.ndarray) -> float:
    """The chance that a uniformly drawn superpixel touches the artefact."""
    return len(np.unique(segments[mask])) / len(np.unique(segments))
