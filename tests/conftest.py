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
    trained_tiny_cnn,
    write_photo_folder,
    write_tiny_weights,
)


@pytest.fixture(scope="session")
def calibrated():
    """A trained 3-class TinyCNN and its table on 600 images of its training classes, with a
    conformal null of 2,000 held-out images of the same distribution (:func:`heldout_dataset`),
    so its reports carry p-values and alarms.

    Shared by the whole session: a test that changes the table must restore it."""
    from calibrate import calibrate

    model = trained_tiny_cnn(num_classes=3, seed=1)
    table = calibrate(
        model, class_dataset(600, 3, seed=1), heldout=heldout_dataset(2000), progress=False
    )
    return model, table


@pytest.fixture(scope="session")
def saved_tiny_model(calibrated, tmp_path_factory):
    """:func:`calibrated` saved: ``(model, table, args)``, ``args`` being examples/serve.py's
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
