"""The README's Python examples run as written, in order, against a tiny CNN on real photos.

Each ```python block of README.md runs in one namespace (a later block may use what an earlier
one made, as a reader would), in a temporary working folder, with the names the README leaves
to the reader bound to small real objects: ``build_my_cnn`` (a seeded 4-class TinyCNN),
``train_set`` / ``train_loader`` / ``val_loader`` (crops of scikit-image's sample photos, with
varied labels), ``x`` (one photo crop) and ``log``. The test then checks what the blocks made.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests._models import TinyCNN, normalise, photo_crops, seeded

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture()
def reader(tmp_path, monkeypatch) -> dict:
    """The names the README's examples take as given."""
    monkeypatch.chdir(tmp_path)
    images, labels = photo_crops()
    data = TensorDataset(normalise(images), torch.from_numpy(labels))
    train = torch.utils.data.Subset(data, range(0, len(data), 2))
    held = torch.utils.data.Subset(data, range(1, len(data), 2))
    build = lambda: seeded(TinyCNN(num_classes=4))  # noqa: E731
    with torch.no_grad():  # the fix example's image: one the model does not give class 3
        first = int((build()(data.tensors[0]).argmax(1) != 3).nonzero()[0])
    return {
        "build_my_cnn": build,
        "train_set": train,
        "train_loader": DataLoader(train, batch_size=32, shuffle=False),
        "val_loader": DataLoader(held, batch_size=32, shuffle=False),
        "x": data[first][0][None],
        "log": logging.getLogger("readme"),
    }


def test_the_readme_has_the_examples_this_test_checks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    assert any("SurpriseMonitor(" in b and "calibrate(" in b for b in blocks)
    assert any("monitor.explain(" in b for b in blocks)


def test_every_python_example_runs_as_written(reader):
    ns = dict(reader)
    for i, block in enumerate(python_blocks(README.read_text())):
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, ns)  # noqa: S102 - the project's own README
    model, x = ns["model"], ns["x"]
    with torch.no_grad():
        torch.testing.assert_close(ns["logits"], model(x))  # drop-in: what model(x) returns
    report = ns["report"]
    assert report.surprise.shape == (1, ns["table"].num_filters)
    assert torch.isfinite(report.beta).all()
    r = ns["r"]  # the alarm example: a table with a held-out null
    assert 0.0 < float(r.p_value[0]) <= 1.0 and r.alarm.dtype == torch.bool
    assert ns["expl"].segments.shape == x.shape[-2:] and len(ns["expl"].scores) > 1
    assert Path("table.safetensors").is_file()
    assert Path("input.png").stat().st_size > 0 and Path("why.png").stat().st_size > 0
    assert isinstance(ns["res"].fixed, bool)
