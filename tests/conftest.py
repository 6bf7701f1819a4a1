"""Shared fixtures; and Triton kernels run through the interpreter on CPU-only machines.

``TRITON_INTERPRET`` must be set before any test imports ``kernels.*_triton`` (``@triton.jit``
reads it when the kernel module is imported). Importing torch does not import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests._models import (  # noqa: E402
    class_dataset,
    heldout_dataset,
    photo_crops,
    tiny_vgg_bn,
    trained_tiny_cnn,
    write_photo_folder,
    write_tiny_weights,
)

CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")  # fmt: skip


@pytest.fixture(scope="session")
def calibrated():
    """A trained 3-class TinyCNN and its table on 600 images of its training classes, with a
    conformal null of 2,000 held-out images of the same distribution (:func:`heldout_dataset`),
    so its reports carry p-values and alarms. The calibrate defaults: the gated score, its
    evidence ``learned+knn`` fitted on 500 more held-out images (``--alarm-evidence preferred``
    on a table with a KNN bank).

    Shared by the whole session: a test that changes the table must restore it."""
    from surprise_monitor.calibrate import calibrate

    model = trained_tiny_cnn(num_classes=3, seed=1)
    table = calibrate(
        model, class_dataset(600, 3, seed=1), heldout=heldout_dataset(2500), progress=False
    )
    return model, table


@pytest.fixture(scope="session")
def saved_tiny_model(calibrated, tmp_path_factory):
    """:func:`calibrated` saved: ``(model, table, args)``, ``args`` being surprise-serve's
    model and table options for the weights and table files."""
    model, table = calibrated
    folder = tmp_path_factory.mktemp("model")
    weights, saved = folder / "model.pt", folder / "table.safetensors"
    torch.save(model.state_dict(), weights)
    table.save(saved)
    args = ["--model", "tests._models:TinyCNN", "--model-kwargs", '{"num_classes": 3}',
            "--weights", str(weights), "--table", str(saved)]  # fmt: skip
    return model, table, args


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A seeded 3-class TinyCNN's state_dict file."""
    return write_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.pt")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """Makes ImageFolders of real-photo crops: ``photo_folder({photo: count}, seed)``."""

    def make(counts: dict[str, int], seed: int = 0):
        return write_photo_folder(tmp_path_factory.mktemp("images"), counts, seed=seed)

    return make


@pytest.fixture()
def fake_cifar(tmp_path):
    """A folder with ``cifar10_train.npz`` (160 images) and ``cifar10_test.npz`` (40) of
    CIFAR-shaped real-photo crops (classes 0, 2, 4, 6 of the ten; not the shared data)."""
    import numpy as np

    images, labels = photo_crops(size=32, side=96, stride=16)  # 200 crops of 4 photos
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order] * 2
    names = np.array(CIFAR_NAMES)
    np.savez(tmp_path / "cifar10_train.npz", x=images[:160], y=labels[:160], class_names=names)
    np.savez(tmp_path / "cifar10_test.npz", x=images[160:], y=labels[160:], class_names=names)
    return tmp_path


@pytest.fixture()
def tiny_strong(fake_cifar, tmp_path, monkeypatch):
    """The ``vgg_bn`` set-up of the paper scripts played by a tiny
    :class:`bench.strong_models.VGGBN` (width 4, 40 Adam steps on the fake CIFAR-10), with the
    data, the cache and the scripts' outputs (results, figures, report) in temporary folders;
    held-out tables on test images 0..19, reported on 20..39."""
    from bench import strong_tables
    from bench.paper import __main__ as paper_main
    from bench.paper import common, failures

    monkeypatch.setenv("SURPRISE_DATA_DIR", str(fake_cifar))
    monkeypatch.setenv("SURPRISE_MONITOR_CACHE", str(tmp_path / "cache"))
    model = tiny_vgg_bn(fake_cifar, steps=40)
    monkeypatch.setattr(common, "load_strong", lambda name: model)
    monkeypatch.setitem(strong_tables.SPLITS, "heldout", ("test", 0, 20, "true"))
    monkeypatch.setitem(strong_tables.SPLITS, "heldout_pred", ("test", 0, 20, "pred"))
    monkeypatch.setattr(common, "HELDOUT_EVALUATION", (20, 40))
    out = tmp_path / "paper"
    for module, name, value in (
        (common, "RESULTS", out / "results"), (common, "FIGURES", out / "figures"),
        (failures, "FIGURES", out / "figures"), (paper_main, "HERE", out),
        (paper_main, "RESULTS", out / "results"),
    ):  # fmt: skip
        monkeypatch.setattr(module, name, value)
    return common.load_setup("vgg_bn", fake_cifar)
