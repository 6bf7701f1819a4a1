"""``surprise-explain`` end to end: an ImageFolder calibrated through ``surprise-calibrate``, then
one photo explained from the command line, checked against the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surprise_monitor.calibrate import CalibrationTable
from surprise_monitor.calibrate.cli import main as calibrate_main
from surprise_monitor.monitor import SurpriseMonitor
from surprise_monitor.monitor.explain.cli import main as explain_main
from tests._models import PHOTOS, TinyCNN, normalise, photo, photo_crops, seeded

MODEL = ["--model", "tests._models:TinyCNN", "--model-kwargs", '{"num_classes": 4}']


@pytest.fixture(scope="module")
def cli_calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    images, labels = photo_crops()
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / "train" / PHOTOS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    weights = root / "tiny.pt"
    model = seeded(TinyCNN(num_classes=4), seed=3)
    torch.save(model.state_dict(), weights)
    table = root / "table.safetensors"
    rc = calibrate_main([
        *MODEL, "--weights", str(weights),
        "--data", str(root / "train"), "--out", str(table), "--resize", "0", "--crop", "0",
        "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--quiet",
    ])  # fmt: skip
    assert rc == 0
    probe = root / "probe.png"
    Image.fromarray(photo("coffee", 128)[40:72, 40:72]).save(probe)
    return root, model, weights, table, probe


def test_cli_writes_the_figure_and_agrees_with_the_api(cli_calibrated, capsys):
    root, model, weights, table, probe = cli_calibrated
    out, single = root / "why.png", root / "input.png"
    rc = explain_main([
        "--table", str(table), *MODEL, "--weights", str(weights), "--image", str(probe),
        "--label", "coffee", "--out", str(out), "--input-out", str(single), "--json",
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    t = CalibrationTable.load(table)
    assert result["label"] == 2 and result["class_name"] == "coffee"
    want = [int(i) for i in t.top_indices[2, result["filter"]].tolist() if i >= 0]
    assert [e["index"] for e in result["exemplars"]] == want and len(want) == 6
    from torchvision.datasets import ImageFolder

    files = ImageFolder(str(root / "train")).samples  # exemplars are named by their file
    assert [e["path"] for e in result["exemplars"]] == [files[i][0] for i in want]
    fig = np.asarray(Image.open(out).convert("RGB"))
    assert fig.shape[1] == int(2.4 * 7 * 100) and fig.std() > 20
    assert Image.open(single).size == (256, 256)
    # The same explanation through the Python API, on the same preprocessed image.
    x = normalise(np.array(Image.open(probe).convert("RGB"))[None])
    with SurpriseMonitor(model, t) as monitor:
        expl = monitor.explain(x, label=2, exemplars_k=0)
    assert (expl.filter, expl.kind, expl.top_segment) == (
        result["filter"],
        result["kind"],
        result["top_segment"],
    )
    assert expl.alpha == pytest.approx(result["alpha"], rel=1e-5)


def test_cli_explains_without_a_label_and_names_bad_arguments(cli_calibrated, capsys):
    root, _, weights, table, probe = cli_calibrated
    base = ["--table", str(table), *MODEL, "--weights", str(weights), "--out", str(root / "f.png")]
    assert explain_main([*base, "--image", str(probe), "--exemplars", "2"]) == 0
    text = capsys.readouterr().out
    assert "figure written to" in text and "exemplars of '" in text
    assert explain_main([*base, "--image", str(probe), "--label", "teapot"]) == 2
    assert "neither a class name nor an index" in capsys.readouterr().err
    assert explain_main([*base, "--image", str(root / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert explain_main([*base, "--image", str(table)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_console_script():
    script = Path(sys.executable).with_name("surprise-explain")  # the venv's, active or not
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--table" in out.stdout and "exemplars" in out.stdout


def test_a_resigned_table_cannot_send_explain_out_of_its_folder(cli_calibrated, tmp_path, capsys):
    import shutil

    from tests._checks import resign

    root, _, weights, table, probe = cli_calibrated
    forged = tmp_path / "forged.safetensors"
    shutil.copy(table, forged)
    escape = str(root / "train" / ".." / "elsewhere")
    resign(forged, lambda meta: meta["data_source"].update(root=escape))
    base = ["--table", str(forged), *MODEL, "--weights", str(weights), "--image", str(probe),
            "--out", str(tmp_path / "why.png")]  # fmt: skip
    capsys.readouterr()
    assert explain_main(base) == 2
    err = capsys.readouterr().err
    assert "contains '..'" in err and "--data FOLDER" in err and "dataset=" not in err
    assert explain_main([*base, "--data", str(root / "train"), "--json"]) == 0  # the caller's
    assert len(json.loads(capsys.readouterr().out)["exemplars"]) == 6


def test_cli_messages_speak_the_command_line(cli_calibrated, tmp_path, capsys):
    root, _, weights, table, probe = cli_calibrated
    base = ["--table", str(table), *MODEL, "--image", str(probe), "--out", str(tmp_path / "f.png")]
    capsys.readouterr()
    assert explain_main([*base, "--weights", str(weights), "--label", "cofee"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'coffee'?" in err and "astronaut, chelsea, coffee, rocket" in err
    other = tmp_path / "other.pt"
    torch.save(seeded(TinyCNN(num_classes=4), seed=9).state_dict(), other)
    assert explain_main([*base, "--weights", str(other), "--exemplars", "0"]) == 2
    err = capsys.readouterr().err
    assert "--no-fingerprint-check" in err and "check_fingerprint" not in err
    flags = [*base, "--weights", str(other), "--exemplars", "0", "--no-fingerprint-check"]
    assert explain_main(flags) == 0
    with pytest.raises(SystemExit):
        explain_main([*base, "--weights", str(weights), "--no-fingerprint"])  # no abbreviations
