"""Smoke test of the fix-rate benchmark's pipeline (bench/cifar.py, bench/fix_rate.py) on a few
CIFAR-shaped images written to a temporary folder (real photo crops, not the shared data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import cifar
from bench.fix_rate import main as fix_rate_main


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


def test_rates_and_paired_difference_by_hand():
    from scipy.stats import binomtest

    from bench.fix_rate import paired_difference, proportion

    p = proportion(3, 12)
    assert p["percent"] == 25.0 and p["se"] == pytest.approx(100 * np.sqrt(0.25 * 0.75 / 12))
    a = [True, True, True, False, False, True, False, False, False, False]
    b = [True, False, False, True, False, False, False, False, False, False]
    d = paired_difference(a, b)  # only a: images 1, 2, 5; only b: image 3
    assert (d["only_first"], d["only_second"]) == (3, 1)
    assert d["difference"] == pytest.approx(20.0)
    assert d["se"] == pytest.approx(100 * np.sqrt((0.4 - 0.04) / 10))
    assert d["p_value"] == pytest.approx(binomtest(3, 4, 0.5).pvalue) == pytest.approx(0.625)
    assert paired_difference([True], [True])["p_value"] == 1.0


def test_a_strong_model_uses_its_training_table(fake_cifar, tmp_path, monkeypatch):
    import bench.fix_rate as fr
    from bench.strong_models import VGGBN

    monkeypatch.setenv(cifar.CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = VGGBN(width=4).eval()
    monkeypatch.setattr(fr, "load_strong", lambda name: model)
    summary = fr.main(["--model", "vgg_bn", "--images", "2", "--n-segments", "10",
                       "--remove", "1", "--data-dir", str(fake_cifar)])  # fmt: skip
    assert summary["arch"] == "vgg_bn" and summary["images"] == 2
    assert len(list((tmp_path / "cache" / "strong").glob("vgg_bn-*-train.safetensors"))) == 1
    for row in summary["rows"]:
        assert len(row["surprise"]["attempts"]) == 1 and row["pixels"] == 32 * 32
