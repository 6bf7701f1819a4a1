"""The surprise-calibrate command line on a small ImageFolder of real photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibrate import CalibrationTable
from calibrate.cli import main
from tests._models import TinyCNN, seeded


@pytest.fixture(scope="module")
def image_folder(photo_folder):
    """Three classes of 40x40 crops from three real photos, five per class."""
    return photo_folder({"astronaut": 5, "chelsea": 5, "coffee": 5}, seed=0)


def _args(image_folder, out, weights, *extra):
    return [
        "tests._models:TinyCNN", "--model-kwargs", json.dumps({"num_classes": 3}),
        "--weights", str(weights), "--data", str(image_folder), "--out", str(out),
        "--resize", "36", "--crop", "32", "--batch-size", "4", "--quiet", *extra,
    ]  # fmt: skip


def test_cli_writes_a_table_and_a_summary(image_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "table.safetensors"
    assert main(_args(image_folder, out, tiny_weights, "--top-k", "3")) == 0
    text = capsys.readouterr().out
    assert "layer: features.2 (last nn.Conv2d executed" in text
    assert "images per class: astronaut=5, chelsea=5, coffee=5" in text
    assert "3 classes have fewer than 1000 images" in text
    assert f"table written to {out}" in text and "images/s" in text
    table = CalibrationTable.load(out)
    assert table.class_names == ["astronaut", "chelsea", "coffee"]
    assert table.input_shape == (3, 32, 32) and table.top_k == 3
    assert table.data_source["kind"] == "imagefolder" and table.data_source["crop"] == 32
    model = seeded(TinyCNN(num_classes=3))
    from calibrate import model_fingerprint

    assert table.model_fingerprint == model_fingerprint(model)


def test_cli_named_layer_and_torchvision_arch(image_folder, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code = main([
        "resnet18", "--data", str(image_folder), "--out", str(out), "--resize", "40",
        "--crop", "32", "--layer", "layer3", "--batch-size", "8", "--quiet",
    ])  # fmt: skip
    assert code == 0
    table = CalibrationTable.load(out)
    assert table.layer == "layer3" and table.num_filters == 256 and table.num_classes == 3


def test_cli_errors_are_clear(image_folder, tiny_weights, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(_args(image_folder, tmp_path / "o", bad)) == 2
    assert "not a loadable state_dict file" in capsys.readouterr().err
    assert main(_args(tmp_path / "missing", tmp_path / "o", tiny_weights)) == 2
    assert "no such folder" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save(seeded(TinyCNN(num_classes=3, width=4)).state_dict(), other)
    assert main(_args(image_folder, tmp_path / "o", other)) == 2
    assert "weights do not fit the model" in capsys.readouterr().err
    assert main(["nosuchnet", "--data", str(image_folder), "--out", str(tmp_path / "o")]) == 2
    assert "neither a torchvision model name" in capsys.readouterr().err


def test_python_dash_m_and_console_script():
    script = Path(sys.executable).with_name("surprise-calibrate")  # the venv's, active or not
    for cmd in ([sys.executable, "-m", "calibrate", "--help"], [str(script), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "--layer" in out and "ImageFolder" in out
