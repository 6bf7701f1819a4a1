"""The VGG-BN training script resumes an interrupted run to the same weights, and refuses a
checkpoint made with other settings (tiny random data, a narrow VGG: seconds on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench import train_vgg_bn
from bench.cifar import CifarSplit

ARGS = ["--epochs", "2", "--width", "4", "--batch", "16", "--seed", "3"]


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    """Random CIFAR-shaped splits and a temporary weights path."""

    def load(split: str, *a, **k) -> CifarSplit:
        rng = np.random.default_rng(0 if split == "train" else 1)  # the same images every call
        n = 48 if split == "train" else 5010  # the record scores test 0..4,999 and the rest
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(n) % 10
        return CifarSplit(images, labels.astype(np.int64), [str(i) for i in range(10)], tmp_path)

    monkeypatch.setattr(train_vgg_bn, "load_cifar10", load)
    monkeypatch.setattr(train_vgg_bn, "vgg_weights_path", lambda: tmp_path / "vgg.safetensors")
    monkeypatch.setattr(train_vgg_bn, "cache_dir", lambda: tmp_path)  # the checkpoint
    return tmp_path


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "vgg.safetensors"))


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny, tmp_path):
    torch.set_num_threads(1)
    train_vgg_bn.main(ARGS)
    whole = _weights(tiny)
    (tiny / "vgg_bn.checkpoint.pt").unlink()
    train_vgg_bn.main([*ARGS, "--budget-min", "0"])  # stops after epoch 1, checkpoint kept
    assert train_vgg_bn.checkpoint_path().exists()
    train_vgg_bn.main([*ARGS, "--resume"])
    resumed = _weights(tiny)
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)


def test_a_checkpoint_of_other_settings_is_refused(tiny):
    train_vgg_bn.main([*ARGS, "--budget-min", "0"])
    with pytest.raises(SystemExit, match="was made with"):
        train_vgg_bn.main(["--epochs", "3", *ARGS[2:], "--resume"])
