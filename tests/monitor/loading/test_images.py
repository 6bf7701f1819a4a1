"""The one preprocessing pipeline: what surprise-calibrate applies and records is what the
explanations read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from surprise_monitor.monitor.loading import Preprocessing, source_images


def test_the_record_round_trips_and_overrides_win(tmp_path):
    steps = Preprocessing(36, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.25), grayscale=False)
    record = steps.source(tmp_path)
    assert record == {
        "kind": "imagefolder", "root": str(tmp_path.resolve()), "resize": 36, "crop": 32,
        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "grayscale": False,
    }  # fmt: skip
    assert Preprocessing.from_source(record) == steps
    assert Preprocessing.from_source(record, crop=None, resize=0).resize == 0
    with pytest.raises(ValueError, match="records no normalisation"):
        Preprocessing.from_source({"kind": "imagefolder"})
    with pytest.raises(ValueError, match="mean has 3 values, std 1"):
        Preprocessing(0, 0, (0.5, 0.5, 0.5), (0.2,))


def test_an_image_file_gets_the_imagefolder_tensor(photo_folder):
    root = photo_folder({"astronaut": 2, "coffee": 1}, seed=3)
    for grayscale in (False, True):
        steps = Preprocessing(36, 32, (0.5,) * (1 if grayscale else 3), (0.25,) * (1 if
                              grayscale else 3), grayscale)  # fmt: skip
        folder = ImageFolder(str(root), transform=steps.transform())
        path, _ = folder.samples[2]
        single = steps.load_image(path)
        assert single.shape == (1, 1 if grayscale else 3, 32, 32)
        torch.testing.assert_close(single[0], folder[2][0], rtol=0, atol=0)
        torch.testing.assert_close(source_images(steps.source(root), [2]), single, rtol=0, atol=0)


def test_without_resize_or_crop_the_table_size_is_used(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(path)
    steps = Preprocessing(0, 0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert steps.load_image(path).shape == (1, 3, 20, 40)
    assert steps.load_image(path, size=(8, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="not a readable image"):
        steps.load_image(tmp_path / "missing.png")
