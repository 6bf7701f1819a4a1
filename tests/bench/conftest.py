"""Fixtures of the benchmark tests."""

from __future__ import annotations

import numpy as np
import pytest

from bench.alarms import sets

CLASSES = (3, 5, 8, 13, 21, 34)  # Tiny ImageNet class indices of the fake file, 6 images each


@pytest.fixture()
def fake_data(fake_cifar, monkeypatch):
    """The fake CIFAR-10 folder (40 test images: selection 0..19, report 20..39; the selection
    part's shifted sets from its image 5 on) with small MNIST-family files (20 images each) and
    a fake ``tinyimagenet_dev_32.npz``."""
    rng = np.random.default_rng(7)
    for name in sets.FAR:
        x = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
        np.savez(fake_cifar / f"{name}_test.npz", x=x, y=np.zeros(20, np.int64))
    y = np.repeat(np.array(CLASSES, np.int64), 6)
    np.savez(fake_cifar / f"{sets.TINYIMAGENET}.npz",
             x=rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), y=y,
             class_names=np.array([f"c{c}" for c in CLASSES]))  # fmt: skip
    monkeypatch.setenv("SURPRISE_DATA_DIR", str(fake_cifar))
    monkeypatch.setattr(sets, "HELDOUT", range(0, 20))
    monkeypatch.setattr(sets, "EVALUATION", range(20, 40))
    monkeypatch.setattr(sets, "SELECTION_BASE", 5)
    return fake_cifar
