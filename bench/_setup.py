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
    """Torchvision model ``name`` with random weights (seed 0), in eval mode.

    A classifier head that is initialised to zeros (torchvision's ViT: ``heads.head``) is
    re-initialised with small random weights (truncated normal, std 0.02, zero bias, as timm
    initialises a ViT head), for the benchmark only: with a zero head every class score's
    gradient is 0, so every alpha is 0 and calibration refuses the table as degenerate. Timing
    and memory do not change, and the check that the peers' values equal the monitor's alpha
    compares non-zero values.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = linears[-1] if linears else None
    if head is not None and not head.weight.detach().any():
        with torch.no_grad():
            torch.nn.init.trunc_normal_(head.weight, std=0.02)
            if head.bias is not None:
                head.bias.zero_()
    return model


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
      ``LayerGradientXActivation(model, layer).attribute(x, target=pred)`` averaged over the
      positions.
    - ``gradcam``: pytorch-grad-cam's ``ActivationsAndGradients`` capture, as its ``BaseCAM``
      drives it (forward with grad, ``model.zero_grad()``, ``backward(retain_graph=True)`` of
      the summed predicted-class scores), then ``activation * gradient`` averaged over the
      positions.

    The positions are those of the layer's layout, as the monitor reads it (the table's layer
    spec, :mod:`surprise_monitor.monitor.probe.layout`): a ``[B, C, H, W]`` map's H x W, a
    channels-last ``[B, H, W, C]`` map's H x W, a transformer's ``[B, T, C]`` tokens (every token,
    the class token included); each peer's raw layer output is viewed with ``as_nchw`` (for
    pytorch-grad-cam as its ``reshape_transform``) and averaged over its last two axes.

    ``gradcam`` leaves hooks on ``model`` that record every later forward: give it its own copy.
    """
    from surprise_monitor.monitor.probe import get_module
    from surprise_monitor.monitor.probe.layout import as_nchw, split_layer

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
    spec = CalibrationTable.load(path, exemplars=False).layer
    layer, layout = get_module(model, spec), split_layer(spec)[1]

    def per_filter(t: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: ``t`` (the layer's raw output shape) averaged over its positions."""
        return as_nchw(t, layout).mean(dim=(2, 3))

    if mode == "captum":
        from captum.attr import LayerGradientXActivation

        lga = LayerGradientXActivation(model, layer)

        def captum(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # inference tensors cannot be Captum's targets
                pred = model(x).argmax(dim=1)
            return per_filter(lga.attribute(x, target=pred))

        return captum
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    capture = ActivationsAndGradients(model, [layer], lambda t: as_nchw(t, layout))

    def gradcam(x: torch.Tensor) -> torch.Tensor:
        out = capture(x)
        pred = out.detach().argmax(dim=1)
        model.zero_grad()
        out.gather(1, pred[:, None]).sum().backward(retain_graph=True)
        alpha = (capture.activations[0] * capture.gradients[0]).mean(dim=(2, 3))
        capture.activations, capture.gradients = [], []
        return alpha

    return gradcam
