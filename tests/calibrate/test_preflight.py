"""The pre-flight accuracy check of surprise-calibrate: at chance it stops before the long run,
naming the likely causes by what is known (the input size fed and the one the model declares,
the normalisation, the weights, the class order); ``--min-accuracy 0`` carries on."""

from __future__ import annotations

import json
import re
from argparse import Namespace

import pytest
import torch

from surprise_monitor.calibrate import CalibrationTable
from surprise_monitor.calibrate import cli as calibrate_cli
from surprise_monitor.calibrate.cli import main
from surprise_monitor.calibrate.diagnosis import (
    ModelOrigin,
    accuracy_verdict,
    class_order_cause,
    declared_input_size,
    normalisation_cause,
)
from surprise_monitor.calibrate.preflight import AccuracyCheck
from surprise_monitor.monitor.loading.images import Preprocessing
from tests._models import EightPixelNet, TinyCNN, write_colour_folder

ORDER = ["--class-order", "red,green,blue"]  # the model's labels (the folders sort otherwise)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Noisy solid-colour 8x8 images, six per class (EightPixelNet's training size)."""
    return write_colour_folder(tmp_path_factory.mktemp("data") / "colours")


def _run(colours, out, *extra, declare=False):
    """surprise-calibrate on :class:`EightPixelNet`, a factory that brings its own weights."""
    return main([
        "--model", "tests._models:EightPixelNet", "--model-kwargs",
        json.dumps({"declare": declare}), "--data", str(colours), "--out", str(out),
        "--mean", "0", "--std", "1", "--no-alarm", "--quiet", *ORDER, *extra,
    ])  # fmt: skip


def _calls(monkeypatch) -> list[int]:
    """Record the calibrations the command line starts."""
    calls: list[int] = []
    real = calibrate_cli.calibrate
    monkeypatch.setattr(
        calibrate_cli, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    return calls


@pytest.mark.parametrize("declare", [False, True], ids=["undeclared", "pretrained_cfg"])
def test_the_wrong_input_size_stops_after_the_preflight_check_naming_it(
    colours, tmp_path, capsys, monkeypatch, declare
):
    calls, out = _calls(monkeypatch), tmp_path / "t.safetensors"
    assert _run(colours, out, "--resize", "32", "--crop", "32", declare=declare) == 2
    captured = capsys.readouterr()
    assert "model accuracy on 18 calibration images (3 classes): 33.3%" in captured.out
    err = captured.err
    assert "ERROR" in err and "no better than chance (33.3%)" in err
    fed = "input size: the images were fed at 3x32x32 (--resize 32 --crop 32)"
    assert fed in err
    if declare:
        assert "but the model declares 3x8x8 (its pretrained_cfg['input_size'])" in err
    else:
        assert "the model declares no input size" in err
    assert "--resize and --crop" in err and "--min-accuracy 0" in err
    assert "no --weights" not in err  # a factory may load its own weights (this one does)
    assert "weights: those tests._models:EightPixelNet sets" in err
    assert "predictions: most images of 2 class folders get the same class" in err
    assert "give it with --class-order" not in err  # one answer for all: not a label order
    last = err.strip().splitlines()[-1]
    assert last == (
        "surprise-calibrate: error: the model's pre-flight accuracy (33.3%) is no better than "
        "chance (33.3%): stopped before calibrating (the likely causes are listed above; "
        "--min-accuracy 0 calibrates anyway)"
    )
    assert calls == [] and not out.exists()


def test_min_accuracy_0_carries_on_and_the_right_size_passes_silently(
    colours, tmp_path, capsys, monkeypatch
):
    calls, out = _calls(monkeypatch), tmp_path / "t.safetensors"
    assert _run(colours, out, "--resize", "32", "--crop", "32", "--min-accuracy", "0") == 0
    assert calls == [1] and CalibrationTable.load(out).input_shape == (3, 32, 32)
    assert "WARNING" not in capsys.readouterr().err  # below no minimum
    assert _run(colours, out, "--resize", "0", "--crop", "0") == 0  # its own 8x8
    captured = capsys.readouterr()
    assert "18 calibration images (3 classes): 100.0%" in captured.out
    assert "WARNING" not in captured.err and "ERROR" not in captured.err


def test_the_weights_are_named_by_what_is_known():
    assert ModelOrigin("tests._models:EightPixelNet").weights_cause() == (
        "weights: those tests._models:EightPixelNet sets (a --weights FILE would be loaded over "
        "them); a factory that does not load trained weights builds an untrained model"
    )
    assert "no --weights flag was given, so torchvision's resnet18 has random weights" in (
        ModelOrigin("resnet18").weights_cause()
    )
    with_file = ModelOrigin("tests._models:TinyCNN", weights="w.pt").weights_cause()
    assert with_file.startswith("weights: --weights w.pt was loaded")
    assert ModelOrigin(onnx="m.onnx").weights_cause() is None
    args = Namespace(model="m:f", weights=None, onnx=None)
    assert ModelOrigin.of(args) == ModelOrigin("m:f")


def test_the_declared_input_size_comes_from_timm_or_torchvision():
    assert declared_input_size(EightPixelNet(declare=True), "x:y") == (
        (3, 8, 8), "its pretrained_cfg['input_size']"
    )  # fmt: skip
    plain = TinyCNN()
    plain.default_cfg = {"input_size": [3, 32, 32]}
    assert declared_input_size(plain, None) == ((3, 32, 32), "its default_cfg['input_size']")
    assert declared_input_size(TinyCNN(), "tests._models:TinyCNN") is None
    assert declared_input_size(TinyCNN(), "resnet18") == (
        (3, 224, 224), "torchvision's pretrained resnet18 weights"
    )  # fmt: skip


def _check(**kw) -> AccuracyCheck:
    """An accuracy check of 500 images of 10 classes (50 each)."""
    base = {"correct": 50, "images": 500, "classes": 10, "swapped": [], "chance": 0.1,
            "input_shape": (3, 224, 224), "channel_mean": (0.1, 0.0, -0.1),
            "channel_std": (1.0, 1.1, 0.9)}  # fmt: skip
    return AccuracyCheck(**{**base, **kw})


def test_at_chance_means_the_interval_reaches_chance():
    assert _check(correct=50).at_chance  # 10.0%: chance itself
    assert _check(correct=58).at_chance  # 11.6%: interval 9.1-14.7%
    assert not _check(correct=75).at_chance  # 15.0%: interval 12.1-18.4%
    assert not _check(classes=1, chance=1.0, correct=0).at_chance  # one class: no chance level
    small = _check(correct=4, images=6, classes=3, chance=1 / 3)  # 66.7% of 6: not shown better
    assert (
        small.at_chance
        and accuracy_verdict(small, 0.5, Preprocessing(), ModelOrigin(), None) is None
    )


def test_a_cifar_model_fed_imagenet_sized_images_is_stopped_naming_size_and_normalisation():
    steps = Preprocessing(256, 224)  # the command line's defaults
    check = _check(channel_mean=(2.1, 2.0, 1.9), channel_std=(0.3, 0.3, 0.3))
    verdict = accuracy_verdict(check, 0.5, steps, ModelOrigin("cifar:resnet20"), None)
    assert verdict is not None and verdict.stop
    text = verdict.text
    assert "fed at 3x224x224 (--resize 256 --crop 224: ImageNet's, the default)" in text
    assert "(32x32 for CIFAR models)" in text and "--resize 0 --crop 0" in text
    assert re.search(
        r"mean 2\.10, 2\.00, 1\.90 and std 0\.30, 0\.30, 0\.30, far from 0 and 1", text
    )
    assert "no --weights" not in text
    near = normalisation_cause(_check(), steps)
    assert near is not None and "(near 0 and 1)" in near
    below = accuracy_verdict(_check(correct=200), 0.5, steps, ModelOrigin("resnet18"), None)
    assert below is not None and not below.stop and below.text.splitlines()[1].startswith(
        "WARNING: model accuracy on 500 calibration images (10 classes): 40.0%"
    )  # fmt: skip
    assert accuracy_verdict(_check(correct=50), 0.0, steps, ModelOrigin(), None) is None


def test_the_preflight_records_what_the_model_was_fed(colours):
    from surprise_monitor.calibrate.preflight import accuracy_check, image_folder

    steps = Preprocessing(0, 0, (0.0,), (1.0,))
    data = image_folder(colours, steps, ["red", "green", "blue"])
    check = accuracy_check(EightPixelNet(), data, steps, 18, 4, "cpu")
    assert (check.correct, check.images, check.chance) == (18, 18, 1 / 3)
    assert check.input_shape == (3, 8, 8)
    x = torch.stack([data[i][0] for i in range(18)]).double()
    mean, std = (
        torch.tensor(v, dtype=torch.float64) for v in (check.channel_mean, check.channel_std)
    )
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(std, x.std((0, 2, 3), unbiased=False))


def test_a_label_order_is_told_from_a_model_that_answers_one_class():
    permuted = class_order_cause(_check(swapped=[("blue", 2), ("red", 0)]))
    assert permuted is not None and permuted.startswith("class order: most images of 2 class")
    assert "--class-order" in permuted
    collapsed = class_order_cause(_check(swapped=[("green", 0), ("blue", 0)]))
    assert collapsed is not None and collapsed.startswith("predictions: most images of 2 class")
    assert "--class-order" not in collapsed
    assert class_order_cause(_check()) is None
