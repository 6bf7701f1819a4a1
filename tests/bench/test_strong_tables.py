"""bench.strong_tables: the strong models' calibration tables are built through the library on
the right split, cached, and found again (fake CIFAR-10, a tiny VGG-BN)."""

from __future__ import annotations

import pytest
import torch

from bench import strong_tables
from bench.strong_models import VGGBN
from surprise_monitor.calibrate import calibrate
from surprise_monitor.calibrate.options import RunOptions
from surprise_monitor.monitor.probe.layers import FINAL_CONV


@pytest.fixture()
def tiny_vgg(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("SURPRISE_DATA_DIR", str(fake_cifar))
    monkeypatch.setenv("SURPRISE_MONITOR_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    return VGGBN(width=4).eval()


def test_train_table_is_calibrate_on_every_training_image_and_is_cached(tiny_vgg, monkeypatch):
    table = strong_tables.strong_table("vgg_bn", "train", model=tiny_vgg, log=None)
    path = strong_tables.table_path("vgg_bn", tiny_vgg, "train")
    assert path.is_file() and not path.with_suffix(".ckpt").exists()
    ds = strong_tables.split_dataset(tiny_vgg, "train")
    assert len(ds) == 160 and ds.tensors[2].tolist() == list(range(160))
    want = calibrate(tiny_vgg, ds, layer=FINAL_CONV, progress=False, run=RunOptions(batch_size=250))
    assert table.layer == "features.24" and torch.equal(table.counts, want.counts)  # the paper's
    assert torch.equal(table.quantiles, want.quantiles) and torch.equal(table.mean, want.mean)
    assert table.data_source["path"].endswith("cifar10_train.npz")

    def no_calibration(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(strong_tables, "calibrate", no_calibration)
    again = strong_tables.strong_table("vgg_bn", "train", model=tiny_vgg, log=None)
    assert torch.equal(again.quantiles, table.quantiles)


def test_heldout_tables_use_test_images_with_true_or_predicted_labels(tiny_vgg, fake_cifar):
    from bench.cifar import cifar10_dataset

    x, y = cifar10_dataset("test", fake_cifar).tensors
    with torch.no_grad():
        pred = tiny_vgg(x).argmax(1)
    true = strong_tables.strong_table("vgg_bn", "heldout", model=tiny_vgg, log=None)
    by_pred = strong_tables.strong_table("vgg_bn", "heldout_pred", model=tiny_vgg, log=None)
    assert torch.equal(true.counts, torch.bincount(y, minlength=10))
    assert torch.equal(by_pred.counts, torch.bincount(pred, minlength=10))
    assert by_pred.data_source["path"].endswith("cifar10_test.npz")
    with pytest.raises(ValueError, match="split must be one of"):
        strong_tables.split_dataset(tiny_vgg, "validation")
