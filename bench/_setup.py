"""Shared set-up for the benchmarks: models with random weights and their calibration tables."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

from calibrate import CalibrationTable, calibrate

CACHE = Path(__file__).resolve().parent / ".cache"


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def table_for(name: str, model: torch.nn.Module, size: int = 224) -> Path:
    """A table for ``model`` (1000 classes) calibrated on a few random images; cached on disk.

    Timing and memory do not depend on the table's values, only on its shape.
    """
    path = CACHE / f"{name}-{size}.safetensors"
    if path.exists():
        try:
            CalibrationTable.load(path)
            return path
        except ValueError:
            path.unlink()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, size, size, generator=g)
    labels = torch.randint(0, 1000, (16,), generator=g)
    calibrate(model, TensorDataset(images, labels), batch_size=8, progress=False).save(path)
    return path


def batch(size: int = 224, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
