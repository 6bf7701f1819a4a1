"""Models from names and files: a torchvision architecture or an importable factory, weights
from a state_dict file (never unpickled), and the device a model lives on."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def build_model(spec: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """A torchvision architecture name (random weights) or an importable ``module:factory``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import model factory {spec!r}: {exc}") from exc
        model = factory(**kwargs)
    else:
        import torchvision

        if spec not in torchvision.models.list_models():
            raise ValueError(f"{spec!r} is neither a torchvision model name nor module:factory")
        if num_classes is not None:
            kwargs = {"num_classes": num_classes, **kwargs}
        model = torchvision.models.get_model(spec, weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} did not build a torch nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable state_dict file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the model: {exc}") from exc


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one): what its
    inputs must be (``model.half()`` takes float16 inputs)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
