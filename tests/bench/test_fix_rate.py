"""Smoke test of the fix-rate benchmark's pipeline (bench/cifar.py, bench/fix_rate.py) on a few
CIFAR-shaped images written to a temporary folder (real photo crops, not the shared data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import cifar
from bench.fix_rate import main as fix_rate_main
from tests._models import photo_crops

NAMES = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"])  # fmt: skip


@pytest.fixture()
def fake_cifar(tmp_path):
    images, labels = photo_crops(size=32, side=96, stride=16)  # 200 crops of 4 photos
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order] * 2  # classes 0, 2, 4, 6 of 10
    np.savez(tmp_path / "cifar10_train.npz", x=images[:160], y=labels[:160], class_names=NAMES)
    np.savez(tmp_path / "cifar10_test.npz", x=images[160:], y=labels[160:], class_names=NAMES)
    return tmp_path


def test_data_folder_is_found_or_named(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv(cifar.DATA_ENV, str(fake_cifar))
    split = cifar.load_cifar10("test")
    assert len(split) == 40 and split.images.dtype == np.uint8 and split.class_names[9] == "truck"
    x = cifar.to_tensor(split.images[:2])
    want = (split.images[1, 3, 5, 2] / 255.0 - cifar.CIFAR10_MEAN[2]) / cifar.CIFAR10_STD[2]
    assert x.shape == (2, 3, 32, 32) and float(x[1, 2, 3, 5]) == pytest.approx(want, abs=1e-6)
    assert len(cifar.cifar10_dataset("train", limit=10)) == 10
    with pytest.raises(FileNotFoundError, match="SURPRISE_DATA_DIR"):
        cifar.load_cifar10("train", data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        cifar.load_cifar10("valid")


def test_fix_rate_pipeline_on_a_few_images(fake_cifar, capsys):
    cache = fake_cifar / "cache"
    argv = [
        "--arch", "small_vgg", "--epochs", "1", "--n-train", "160", "--width", "4",
        "--calib", "160", "--images", "3", "--n-segments", "10", "25", "--remove", "1", "2",
        "--data-dir", str(fake_cifar), "--cache", str(cache), "--out", str(fake_cifar / "r.json"),
    ]  # fmt: skip
    summary = fix_rate_main(argv)
    weights = sorted(cache.glob("cifar10-small_vgg-w4-e1-*.pt"))
    assert len(weights) == 1 and len(list(cache.glob("table-*.safetensors"))) == 1
    n = summary["images"]
    assert 1 <= n <= 3 and len(summary["rows"]) == n
    for m in ("surprise", "vanilla", "random"):
        s = summary["methods"][m]
        assert 0 <= s["fixed"] <= n and s["percent"] == pytest.approx(100 * s["fixed"] / n)
        assert s["fixed"] == sum(r[m]["fixed"] for r in summary["rows"])
    for row in summary["rows"]:
        assert row["prediction"] != row["label"]  # only misclassified images are tried
    assert json.loads((fake_cifar / "r.json").read_text())["images"] == n
    out = capsys.readouterr().out
    assert "surprise" in out and "fixed" in out
    # The second run loads the cached weights instead of training again.
    mtime = weights[0].stat().st_mtime_ns
    again = cifar.train_or_load("small_vgg", 1, data_dir=fake_cifar, n_train=160, width=4,
                                cache=cache, log=None)  # fmt: skip
    assert weights[0].stat().st_mtime_ns == mtime
    state = torch.load(weights[0], weights_only=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
