"""Shared set-up for the benchmarks: models with random weights and their calibration tables."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import CalibrationTable, calibrate
from surprise_monitor.calibrate.options import RunOptions

CACHE = Path(__file__).resolve().parent / ".cache"


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def table_for(name: str, model: torch.nn.Module, size: int = 224, check: bool = True) -> Path:
    """A table for ``model`` (1000 classes) calibrated on a few random images; cached on disk
    (``check=False``: an existing file is returned without loading it).

    Timing and memory do not depend on the table's values, only on its shape.
    """
    path = CACHE / f"{name}-{size}.safetensors"
    if path.exists() and not check:
        return path
    if path.exists():
        try:
            CalibrationTable.load(path)
            return path
        except ValueError:
            path.unlink()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, size, size, generator=g)
    labels = torch.randint(0, 1000, (16,), generator=g)
    calibrate(
        model, TensorDataset(images, labels), progress=False, run=RunOptions(batch_size=8)
    ).save(path)
    return path


def batch(size: int = 224, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- peers (bench/test_peers.py)
#: Ways to get a batch's output and per-filter gradient x activation at the target layer.
PEER_MODES = ("plain", "monitor", "captum", "gradcam")


def peer_runner(mode: str, name: str, model: torch.nn.Module):
    """A callable ``run(x)`` for one mode of the peer benchmark, on ``model`` at its table's layer.

    - ``plain``: ``model(x)`` under ``torch.inference_mode()`` (the baseline).
    - ``monitor``: ``SurpriseMonitor.inspect(x)`` (logits, alpha, flags and beta).
    - ``captum``: a plain forward for the predicted classes (Captum returns no logits), then
      ``LayerGradientXActivation(model, layer).attribute(x, target=pred)`` averaged over H x W.
    - ``gradcam``: pytorch-grad-cam's ``ActivationsAndGradients`` capture, as its ``BaseCAM``
      drives it (forward with grad, ``model.zero_grad()``, ``backward(retain_graph=True)`` of
      the summed predicted-class scores), then ``mean_hw(activation * gradient)``.

    ``gradcam`` leaves hooks on ``model`` that record every later forward: give it its own copy.
    """
    from surprise_monitor.monitor.probe import get_module

    if mode not in PEER_MODES:
        raise ValueError(f"mode must be one of {PEER_MODES}, got {mode!r}")
    if mode == "plain":

        def plain(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return plain
    path = table_for(name, model)
    if mode == "monitor":
        from surprise_monitor.monitor import SurpriseMonitor

        return SurpriseMonitor(model, path).inspect
    layer = get_module(model, CalibrationTable.load(path, exemplars=False).layer)
    if mode == "captum":
        from captum.attr import LayerGradientXActivation

        lga = LayerGradientXActivation(model, layer)

        def captum(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # inference tensors cannot be Captum's targets
                pred = model(x).argmax(dim=1)
            return lga.attribute(x, target=pred).mean(dim=(2, 3))

        return captum
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    capture = ActivationsAndGradients(model, [layer], None)

    def gradcam(x: torch.Tensor) -> torch.Tensor:
        out = capture(x)
        pred = out.detach().argmax(dim=1)
        model.zero_grad()
        out.gather(1, pred[:, None]).sum().backward(retain_graph=True)
        alpha = (capture.activations[0] * capture.gradients[0]).mean(dim=(2, 3))
        capture.activations, capture.gradients = [], []
        return alpha

    return gradcam
