"""Shared fixtures of the calibration tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import AlarmOptions, RunOptions
from surprise_monitor.monitor.atypicality import GATED_SCORE_NAME
from surprise_monitor.monitor.table import CalibrationTable
from tests._models import class_images, trained_tiny_cnn

Calibrated = tuple[nn.Module, torch.Tensor, CalibrationTable]


@pytest.fixture
def gated_tiny() -> Callable[..., Calibrated]:
    """A factory: the 3-class tiny CNN (12 training steps) calibrated with the gated score on
    600 class images (300 reference images) with held-out images 600..1,599 of the same draw,
    in batches of ``batch_size``, with further ``AlarmOptions`` fields; gives the model, all
    4,000 drawn images and the table."""

    def make(batch_size: int, **alarm: object) -> Calibrated:
        model = trained_tiny_cnn(steps=12)
        x, y = class_images(4000, 3, seed=1)
        table = calibrate(
            model, TensorDataset(x[:600], y[:600]),
            heldout=TensorDataset(x[600:1600], y[600:1600]), progress=False,
            run=RunOptions(batch_size=batch_size),
            alarm=AlarmOptions(reference_images=300, score=GATED_SCORE_NAME, **alarm),
        )  # fmt: skip
        return model, x, table

    return make
